"""One training loop for every task: AdamW param groups, warmup + cosine schedule, autocast, clipping,
evaluation hook with best-checkpoint selection, a time budget, tqdm progress and a JSONL metrics log.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """How to train; stored in the checkpoint next to the model config."""
    epochs: int = 10
    max_steps: int = 0            # 0: epochs * steps per epoch
    time_budget: float = 0.0      # seconds of training (0: no limit); the schedule then follows the clock
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.05    # share of the run spent in linear warmup
    weight_decay: float = 0.01    # never applied to norms, biases, embeddings
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    dtype: str = "fp32"           # fp32 | bf16 (autocast)
    tokenizer: str = "bpe"        # bpe | char
    seed: int = 1337
    pretrain_epochs: int = 0      # masked-LM pretraining of the encoder before fine-tuning (0: none)
    pretrain_seconds: float = 0.0 # time limit of that phase (0: none)
    pretrain_lr: float = 0.0      # 0: same as lr
    pretrain_news: bool = True    # pretrain on the People's Daily corpus too, not only the training texts
    log_every: int = 10           # steps between metrics-log rows
    eval_every: int = 0           # steps between evaluations (0: once per epoch)

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} must be fp32 or bf16")
        self.betas = tuple(self.betas)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from data import DataError
        raise DataError("--device cuda: no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of Linear layers: norms, biases and embeddings are left alone."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` of the run, then cosine down to min_ratio; progress in [0, 1]."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# -----------------------------------------------------------------------------
# Checkpoints: one file, plain data + tensors, written atomically, read with weights_only=True

def save_checkpoint(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"format_version": CHECKPOINT_VERSION, **payload}, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path: str, train_hint: str) -> dict:
    from data import DataError
    if not os.path.exists(path):
        raise DataError(f"{path}: no checkpoint; train one first with: {train_hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: not a checkpoint of this project (format version "
                        f"{ckpt.get('format_version') if isinstance(ckpt, dict) else None})")
    return ckpt


def load_trained(path: str, task: str, train_hint: str, device):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint of `task`."""
    from data import DataError
    from models import ModelConfig, build_model
    from tokenizer import tokenizer_from_dict
    ckpt = load_checkpoint(path, train_hint)
    if ckpt.get("task") != task:
        raise DataError(f"{path}: a {ckpt.get('task')!r} checkpoint, not a {task!r} one")
    model = build_model(task, ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tokenizer_from_dict(ckpt["tokenizer"]), ckpt


# -----------------------------------------------------------------------------
# The loop

class MetricsLog:
    """Append-only JSONL log; every row also kept in memory for the plots."""

    def __init__(self, path: str | None):
        self.path, self.rows = path, []
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def fit(model: nn.Module, cfg: TrainConfig, batches: Iterator[dict], steps_per_epoch: int,
        evaluate: Callable[[], dict], select: str, on_best: Callable[[dict], None], device: torch.device,
        log: MetricsLog, quiet: bool = False) -> dict:
    """Train until max_steps / epochs / time_budget; evaluate every epoch (or eval_every steps).

    `batches` yields dicts the model takes as keyword arguments, with "labels"; the model returns
    (logits, loss, info). `evaluate()` returns metrics; the best by `select` (higher is better, e.g. val_acc;
    prefix "-" for lower is better, e.g. "-val_loss") is passed to `on_best` (which writes the checkpoint).
    Returns the best evaluation's metrics plus "steps" and "train_seconds".
    """
    from tqdm import tqdm

    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    sign, key = (-1, select[1:]) if select.startswith("-") else (1, select)
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, **opt_kwargs)
    best, best_score = {}, -math.inf
    t0 = time.time()
    tokens_since, t_since = 0, time.time()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=quiet, dynamic_ncols=True)
    step = 0
    while step < total_steps:
        elapsed = time.time() - t0
        if cfg.time_budget and elapsed >= cfg.time_budget:
            break
        # the schedule follows whichever ends first: the steps or the clock
        progress = max(step / total_steps, elapsed / cfg.time_budget if cfg.time_budget else 0.0)
        lr = cfg.lr * lr_factor(progress, cfg.warmup_ratio, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        model.train()
        batch = next(batches)
        with autocast(device, cfg.dtype):
            _, loss, info = model(**batch, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        step += 1
        tokens_since += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["idx"].numel()

        if step % cfg.log_every == 0 or step == total_steps:
            now = time.time()
            tok_s = tokens_since / max(now - t_since, 1e-9)
            tokens_since, t_since = 0, now
            row = {"step": step, "epoch": step / steps_per_epoch, "train_loss": float(loss.detach()), "ce": info["ce"],
                   "aux_balance": info["balance"], "aux_z": info["z"], "lr": lr, "tokens_per_s": tok_s,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "expert_load": [(c.float() / c.sum().clamp(min=1)).tolist() for c in info["counts"]],
                   "time": now - t0}
            log.write(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", aux=f"{info['balance']:.3f}", lr=f"{lr:.1e}",
                            tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if cfg.time_budget and step % 20 == 0:  # show the steps the clock will allow, not the step cap
            bar.total = min(total_steps, max(step, int(step * cfg.time_budget / max(time.time() - t0, 1e-9))))

        budget_done = cfg.time_budget and time.time() - t0 >= cfg.time_budget
        if step % eval_every == 0 or step == total_steps or budget_done:
            metrics = evaluate()
            metrics.update(step=step, epoch=step / steps_per_epoch, time=time.time() - t0)
            log.write({k: v for k, v in metrics.items() if not k.startswith("_")})
            if not quiet:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                  if k.startswith("val_") and isinstance(v, float))
                tqdm.write(f"step {step} (epoch {step / steps_per_epoch:.1f}): {shown}")
            if sign * metrics[key] > best_score:
                best_score, best = sign * metrics[key], metrics
                on_best(metrics)
    bar.close()
    return {**best, "steps": step, "train_seconds": time.time() - t0}


def train_variants(train_fn, variants: dict, train_cfg: TrainConfig, args, device) -> tuple[dict, dict]:
    """Run a task's train() once per model-config variant, each in <out_dir>/<name>/ with its own checkpoint.

    Returns ({name: summary}, {name: metrics-log rows}) for the comparison table and plot.
    """
    import copy
    results, curves = {}, {}
    for name, cfg in variants.items():
        a = copy.copy(args)
        a.out_dir = os.path.join(args.out_dir, name)
        a.checkpoint = os.path.join(args.out_dir, name, "model.pt")
        if not args.quiet:
            print(f"== {name} ==", file=sys.stderr)
        results[name] = train_fn(cfg, train_cfg, a, device)
        curves[name] = MetricsLog.read(os.path.join(a.out_dir, "metrics.jsonl"))
    return results, curves


def markdown_table(results: dict, columns: list[str]) -> str:
    """| model | col ... | rows from {name: {col: value}}; small floats to 4 places, large to 1, missing as '-'."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"
        return "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r.get(c)) for c in columns) + " |" for name, r in results.items()]
    return "\n".join(lines)


def write_comparison(table: str, curves: dict, out_dir: str, key: str, results: dict) -> dict:
    """Save the table as compare.md, plot `key` against wall-clock as compare.png; return the summary dict."""
    import plots
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table, file=sys.stderr)
    png = plots.compare_curves(curves, os.path.join(out_dir, "compare.png"), key)
    return {"compare_table": os.path.join(out_dir, "compare.md"), "compare_plot": png,
            **{f"{n}_{k}": v for n, r in results.items() for k, v in r.items()
               if isinstance(v, (int, float)) and not k.startswith("_")}}
