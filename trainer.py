"""One training loop for every task: AdamW param groups, warmup + cosine schedule, autocast, clipping,
evaluation hook with best-checkpoint selection, a time budget, tqdm progress and a JSONL metrics log.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

import expert_parallel
from checkpoint import save_checkpoint
from models import MoE


# TrainConfig fields that only one task reads (main.py refuses them for the others)
TASK_TRAIN_FIELDS = {"cls": ("pretrain_epochs", "pretrain_steps", "pretrain_seconds", "pretrain_lr",
                             "pretrain_optimizer", "ngram_lr", "pretrain_news", "extra_labelled",
                             "pretrain_shipped"),
                     "seq2seq": ("lexicon_pairs",)}


@dataclass
class TrainConfig:
    """How to train; stored in the checkpoint next to the model config."""
    epochs: int = 10
    max_steps: int = 0            # 0: epochs * steps per epoch
    time_budget: float = 0.0      # seconds of training (0: no limit); the schedule then follows the clock
    batch_size: int = 64
    budget_batch: tuple = ()      # ((seconds, batch[, context]), ...): under --time_budget below `seconds`, the
                                  # batch size and, if given, the context length max_len (the first entry that fits;
                                  # measured per recipe, see configs.json); --batch_size / --set max_len= win
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.05    # share of the run spent in linear warmup
    weight_decay: float = 0.01    # never applied to norms, biases, embeddings
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    dtype: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast) | fp16 (autocast +
                                  # GradScaler, CUDA only); resolved to one of the last three when training starts
    accum_steps: int = 1          # micro-batches per optimizer step (gradient accumulation)
    grad_checkpoint: bool = False # recompute each block's activations in backward (less memory, ~30% slower)
    optimizer: str = "adamw"      # adamw | muon (Muon for the blocks' hidden matrices, AdamW for the rest)
    compile: str = "auto"         # torch.compile the training step: auto (on for CUDA, off on CPU: measured, see
                                  # resolve_compile) | on | off; resolved when training starts
    halt_after: int = 0           # stop after this many steps as if interrupted (the schedule still plans for
                                  # max_steps); --resume goes on from there
    tokenizer: str = "bpe"        # bpe | bpe_hanzi | char
    seed: int = 1337
    pretrain_epochs: int = 0      # masked-LM pretraining of the encoder before fine-tuning (0: none)
    pretrain_steps: int = 0       # step limit of that phase (0: pretrain_epochs decide)
    pretrain_seconds: float = 0.0 # time limit of that phase (0: none)
    pretrain_lr: float = 0.0      # 0: same as lr
    pretrain_optimizer: str = ""  # adamw | muon for that phase ("": same as optimizer)
    ngram_lr: float = 0.0         # learning rate of the classifier's hashed n-gram weights (0: same as lr)
    pretrain_news: bool = True    # pretrain on the People's Daily corpus too, not only the training texts
    pretrain_shipped: bool = False  # pretrain on every review text the project ships too (data.shipped_texts),
                                  # less each text of the val and test splits (theirs, or those of --data)
    extra_labelled: bool = False  # built-in reviews: the shipped reviews of other domains (food delivery, fruit,
                                  # clothes ...; data.EXTRA_SENTIMENT) join the training split; val/test stay
    lexicon_pairs: int = 0        # seq2seq on the built-in pinyin data: word-list pairs from jieba's dictionary
                                  # added to the training pairs (data.lexicon_pairs); ignored with --data
    init_from: str = ""           # sparse upcycling: a dense checkpoint of the same task whose weights start the
                                  # MoE (each expert a copy of its FFN; models.upcycle); "" trains from scratch
    upcycle_noise: float = 0.01   # noise on the upcycled experts' weights, times each matrix's std
    expert_parallel: bool = False # under torchrun: each process holds E/P experts of every MoE layer and the
                                  # tokens travel to them (expert_parallel.py); the rest stays data parallel
    log_every: int = 10           # steps between metrics-log rows
    eval_every: int = 0           # steps between evaluations (0: once per epoch)

    def __post_init__(self):
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype={self.dtype!r} must be auto, fp32, bf16 or fp16")
        for name, allowed in (("optimizer", ("adamw", "muon")), ("pretrain_optimizer", ("", "adamw", "muon"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be adamw or muon")
        if self.tokenizer not in ("bpe", "bpe_hanzi", "char"):
            raise ValueError(f"tokenizer={self.tokenizer!r} must be bpe, bpe_hanzi or char")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must be two numbers in [0, 1), like [0.9, 0.95]")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile={self.compile!r} must be auto, on or off")
        for name in ("batch_size", "accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("epochs", "max_steps", "eval_every", "halt_after", "pretrain_epochs", "pretrain_steps",
                     "lexicon_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a number > 0")
        for name in ("time_budget", "pretrain_seconds", "pretrain_lr", "ngram_lr", "weight_decay", "grad_clip",
                     "label_smoothing", "warmup_ratio", "min_lr_ratio", "upcycle_noise"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)} must be a number >= 0")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} must be <= 1")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be < 1")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("epochs=0 and max_steps=0: nothing to train")
        self.betas = tuple(self.betas)

        def is_entry(entry) -> bool:  # [seconds > 0, batch >= 1] or [seconds, batch, context >= 1]
            return (isinstance(entry, (list, tuple)) and len(entry) in (2, 3)
                    and all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in entry)
                    and entry[0] > 0 and all(int(n) == n >= 1 for n in entry[1:]))

        if not isinstance(self.budget_batch, (list, tuple)) or not all(map(is_entry, self.budget_batch)):
            raise ValueError(f"budget_batch={json.dumps(self.budget_batch)} must be [seconds, batch] or "
                             "[seconds, batch, context] entries like [[120, 8], [360, 32, 64]]")
        self.budget_batch = tuple(tuple(entry) for entry in self.budget_batch)


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


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """"auto" -> bf16 on a CUDA device that supports it, else fp32. On CPU bf16 lost at these widths on every
    machine measured: emulated without AVX-512 BF16 (AMD EPYC, AVX2: classifier fine-tuning 1.4 s vs 0.1 s a
    step), fewer pretraining steps on an Intel Xeon with AMX, slower fine-tuning on an AMD EPYC with
    avx512_bf16 (README, Speed)."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def resolve_compile(compile: str, device: torch.device) -> str:
    """"auto" -> "on" on CUDA, "off" elsewhere. Measured with `bench.py --only train --compile_modes default`:
    on an H100 (bf16) the compiled MoE step took 0.66x the eager one for the LM, 0.85x for classifier
    fine-tuning and 1.04-1.05x (a tie, within the noise) for masked-LM pretraining and seq2seq; on the 2-core CPU
    it was slower at every preset (the grouped experts run outside the compiled graph there, and masked batches
    break the graph at each layer). Compiling costs seconds or more up front."""
    if compile != "auto":
        return compile
    return "on" if device.type == "cuda" else "off"


def autocast(device: torch.device, dtype: str):
    dtype = resolve_dtype(dtype, device)
    if dtype in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Decay only the matrices of Linear layers and experts: norms, biases and embeddings are left alone.
    With `muon`, the hidden matrices of the Transformer blocks (attention projections, dense and expert FFN
    weights) form a third group marked "muon"; embeddings, the router (gate, noise) and the heads stay with AdamW,
    as Muon is meant for hidden layers only."""
    from models import Block, Experts, MoE

    def is_matrix(module: nn.Module, name: str) -> bool:
        return (isinstance(module, nn.Linear) and name == "weight") or (
            isinstance(module, Experts) and name in ("w_up", "w_down"))

    router = {id(p) for m in model.modules() if isinstance(m, MoE)
              for p in (m.gate.weight, *((m.noise.weight,) if m.noise is not None else ()))}
    hidden = {id(p) for block in model.modules() if isinstance(block, Block) for m in block.modules()
              for name, p in m.named_parameters(recurse=False) if is_matrix(m, name) and id(p) not in router}
    decay, no_decay, orthogonal = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if muon and id(p) in hidden:
                orthogonal.append(p)
            elif is_matrix(module, name):
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": orthogonal, "weight_decay": weight_decay, "muon": True}] if muon else [])


@functools.cache  # asked once per matrix shape at every optimizer step; the answer never changes
def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matrix products run natively in it (CUDA; CPUs with AVX-512 BF16 or AMX, read through
    torch.cpu), fp32 elsewhere: emulated bf16 is slower than fp32. The iteration only needs the update's
    direction, so bf16 is what Muon uses (Jordan et al. 2024; torch.optim.Muon). Seq2seq MoE preset, AMD EPYC
    with avx512_bf16, 2 threads: one (8, 128, 256) expert stack 10.5 -> 5.9 ms (2026-12-02)."""
    if device.type == "cuda":
        return torch.bfloat16
    native = (getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))
    return torch.bfloat16 if device.type == "cpu" and any(native) else torch.float32


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About U V^T of g = U S V^T, for g (..., A, B): each matrix of a stack (one per expert) on its own. The
    quintic Newton-Schulz iteration of Muon (Jordan et al. 2024; coefficients from there), run in `dtype`."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.float().norm(dim=(-2, -1), keepdim=True) + eps).to(dtype)  # spectral <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for the param groups marked "muon", AdamW for the others, as one optimizer (one LR schedule, one
    GradScaler, one state_dict). Muon: Nesterov momentum, then the update orthogonalised per matrix (an expert
    stack (E, A, B) per expert) and scaled by 0.2 * sqrt(max(A, B)) so that its RMS matches AdamW's (Liu et al.
    2025, "Muon is scalable for LLM training"): both groups then share the learning rate and weight decay.
    The updates of all matrices of one shape (every layer's query projections, every expert stack) are
    orthogonalised as one batch: a few large products instead of one small chain per parameter.
    torch.optim.Muon takes 2-D parameters only, hence this class."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.999), momentum: float = 0.95,
                 eps: float = 1e-8):
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "momentum": momentum, "eps": eps,
                                  "weight_decay": 0.0, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
            if group["muon"]:
                self._muon_step(params, lr, group["momentum"])
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                beta1, beta2 = group["betas"]
                state["step"] += 1
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))

    def _muon_step(self, params: list[torch.Tensor], lr: float, momentum: float) -> None:
        by_shape: dict[tuple, list] = {}  # (A, B) -> [(param, its Nesterov update (..., A, B))]
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - momentum)
            by_shape.setdefault(tuple(p.shape[-2:]), []).append((p, p.grad.lerp(buf, momentum)))
        for (rows, cols), items in by_shape.items():
            stack = torch.cat([u.reshape(-1, rows, cols) for _, u in items])  # (matrices, A, B)
            ortho = orthogonalize(stack, dtype=newton_schulz_dtype(stack.device))
            scale = -lr * 0.2 * math.sqrt(max(rows, cols))
            for (p, _), o in zip(items, ortho.split([p.numel() // (rows * cols) for p, _ in items])):
                p.add_(o.view_as(p).to(p.dtype), alpha=scale)


def build_optimizer(model: nn.Module, cfg: "TrainConfig", device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, muon=cfg.optimizer == "muon")
    ngram = getattr(model, "ngram", None)
    if ngram is not None and cfg.ngram_lr:  # sparse features: each row sees few batches, so a larger step
        groups = [{**g, "params": [p for p in g["params"] if p is not ngram.weight]} for g in groups]
        groups.append({"params": [ngram.weight], "weight_decay": 0.0, "lr": cfg.ngram_lr})
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, betas=cfg.betas)
    # fused: one kernel for all parameters instead of ~10 ops per tensor. On CPU 4.6x faster than the default
    # per-tensor loop for the seq2seq MoE's 3.0 M parameters (16.2 -> 3.5 ms a step; dense twin 7.7 -> 1.7 ms;
    # 2 threads, 2026-12-02), which is 10% of the MoE's training step
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fused)


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` of the run, then cosine down to min_ratio; progress in [0, 1]."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# -----------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel, each rank training on its share of every global batch

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a plain single-process run."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only rank 0 writes checkpoints, logs and plots."""
    return dist_info()[0] == 0


def init_distributed(device_name: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group, nccl on CUDA (one GPU per local rank) and gloo on
    CPU, and return this rank's device."""
    import torch.distributed as dist
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def shard(batches: Iterator[dict], rank: int, world: int) -> Iterator[dict]:
    """This rank's contiguous slice of each global batch (what DistributedSampler does with indices). Every rank
    draws the same global batches from the same seeded stream, so the ranks never see the same rows."""
    for batch in batches:
        rows = next(iter(batch.values())).size(0)
        if rows < world:  # a tail batch too small to give every rank a row: all ranks skip it alike
            continue
        yield {k: v.tensor_split(world)[rank] for k, v in batch.items()}


def rank0_says(flag: bool) -> bool:
    """Rank 0's decision (time budget, halt) for every rank, so that all of them stop at the same step."""
    import torch.distributed as dist
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=comm_device())
    dist.broadcast(t, 0)
    return bool(t.item())


def mean_over_ranks(*values: float) -> list[float]:
    import torch.distributed as dist
    world = dist_info()[1]
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return (t / world).tolist()


def comm_device() -> torch.device:
    """Where collective tensors live: nccl only moves CUDA tensors."""
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -----------------------------------------------------------------------------
# The loop

class MetricsLog:
    """Append-only JSONL log; every row also kept in memory for the plots and passed to the optional trackers
    (`sinks`: TensorBoard, MLflow; see tracking.py). `append` continues a resumed run. No path: memory only."""

    def __init__(self, path: str | None, append: bool = False, sinks: list | None = None):
        self.path, self.rows, self.sinks = path, [], list(sinks or [])
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if append and os.path.exists(path):
                self.rows = self.read(path)
            else:
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
        for sink in self.sinks:
            sink.write(row)

    def close(self, artifacts: list[str | None] = ()) -> None:
        """End the trackers' runs; `artifacts` (the PNGs) go to the ones that store files."""
        for sink in self.sinks:
            sink.finish([a for a in artifacts if a])
        self.sinks = []


def run_log(args, task: str, model_cfg, train_cfg: TrainConfig, append: bool = False) -> MetricsLog:
    """The metrics log of a --train run: <out_dir>/metrics.jsonl plus the trackers of --tensorboard/--mlflow,
    on rank 0 only (other ranks log to memory)."""
    import tracking
    if not is_main_process():
        return MetricsLog(None)
    return MetricsLog(os.path.join(args.out_dir, "metrics.jsonl"), append,
                      tracking.sinks(args, task, model_cfg, train_cfg))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def count_tokens(batch: dict) -> torch.Tensor | int:
    """Real (unpadded) tokens in a batch: every *attention_mask summed (a device tensor: no host sync), else
    the size of the LM's idx."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    return sum(m.sum() for m in masks) if masks else batch["idx"].numel()


def step_info(infos: list[dict]) -> dict:
    """The logged parts of one optimizer step's micro-batches: CE and aux losses averaged, expert counts summed
    per layer, dropped assignments summed. Still device tensors; the caller reads them (one host sync) only when
    it logs."""
    n = len(infos)
    return {"ce": sum(i["ce"] for i in infos) / n, "balance": sum(i["balance"] for i in infos) / n,
            "z": sum(i["z"] for i in infos) / n, "counts": [sum(c) for c in zip(*(i["counts"] for i in infos))],
            "dropped": sum(i["dropped"] for i in infos)}


@dataclass
class TrainState:
    """Where a run stands; with the optimizer, scheduler and scaler states it is what --resume restores."""
    step: int = 0
    consumed: int = 0                                # batches drawn from the seeded stream (replayed on resume)
    skipped: int = 0                                 # CUDA out-of-memory batches skipped
    best: dict = field(default_factory=dict)         # the best evaluation's metrics so far
    best_score: float = -math.inf
    t0: float = field(default_factory=time.time)     # when training started (moved back on resume)

    def seconds(self) -> float:
        return time.time() - self.t0


class LogWindow:
    """Sums over the steps since the last log row. They stay device tensors between rows: reading them every
    step (`.item()`) would stall a GPU."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.since = 0.0, 0, 0, time.time()

    def add(self, loss: torch.Tensor, tokens: torch.Tensor | int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens


def train_step(net, batches: Iterator[dict], cfg: TrainConfig, device, scaler, state: TrainState,
               world: int) -> tuple[torch.Tensor, list[dict], torch.Tensor | int]:
    """Forward and backward of one optimizer step's `accum_steps` micro-batches -> (their mean loss, their
    infos, their real tokens), still on the device."""
    loss_sum, infos, tokens = 0.0, [], 0
    for micro in range(cfg.accum_steps):
        batch = next(batches)
        state.consumed += 1
        sync = world == 1 or micro == cfg.accum_steps - 1  # DDP averages gradients on the last backward only
        with autocast(device, cfg.dtype), (contextlib.nullcontext() if sync else net.no_sync()):
            _, loss, info = net(**batch, label_smoothing=cfg.label_smoothing)
            scaler.scale(loss / cfg.accum_steps).backward()
        loss_sum = loss_sum + loss.detach() / cfg.accum_steps
        infos.append(info)
        tokens = tokens + count_tokens(batch)
    return loss_sum, infos, tokens


def apply_gradients(model: nn.Module, optimizer, scheduler, scaler, grad_clip: float,
                    sharded: bool = False) -> torch.Tensor | None:
    """Unscale, clip (returns the norm before clipping; `sharded`: over every rank's experts), step the optimizer,
    the scaler and the schedule."""
    scaler.unscale_(optimizer)
    grad_norm = None
    if grad_clip:
        grad_norm = (expert_parallel.clip_grad_norm_(model, grad_clip) if sharded
                     else torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    for module in model.modules():  # balance="bias": each MoE's selection bias follows this step's loads
        if isinstance(module, MoE):
            module.update_bias()
    return grad_norm


def skip_out_of_memory(optimizer, device, state: TrainState, say) -> None:
    """Drop a batch that did not fit and go on; a run that fits no batch at all fails loudly instead."""
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    state.skipped += 1
    say(f"warning: out of memory at step {state.step + 1}; batch skipped ({state.skipped} so far)")
    if state.skipped > 100 and state.skipped > state.step:
        from data import DataError
        raise DataError(f"out of memory on {state.skipped} batches; lower --batch_size or set "
                        "--set grad_checkpoint=true") from None


def log_step(log: "MetricsLog", bar, state: TrainState, window: LogWindow, loss: torch.Tensor, infos: list[dict],
             lr: float, grad_norm, steps_per_epoch: int, world: int) -> LogWindow:
    """Write one metrics row (this step's loss over the whole global batch, the window's mean, tokens/s of all
    ranks, aux losses, expert loads) and show it on the bar; returns a fresh window."""
    now = time.time()
    info = step_info(infos)
    loss, avg_loss, tokens = mean_over_ranks(float(loss), float(window.loss) / window.steps, float(window.tokens))
    tok_s = tokens * world / max(now - window.since, 1e-9)
    row = {"step": state.step, "epoch": state.step / steps_per_epoch, "train_loss": loss,
           "train_loss_avg": avg_loss, "ce": float(info["ce"]), "aux_balance": float(info["balance"]),
           "aux_z": float(info["z"]), "lr": lr, "tokens_per_s": tok_s,
           "grad_norm": float(grad_norm) if grad_norm is not None else None,
           "expert_load": [(c.float() / c.sum().clamp(min=1)).tolist() for c in info["counts"]],
           # assignments cut by capacity_factor (expert choice: tokens no expert took), all MoE layers, this rank
           "dropped": int(info["dropped"]), "time": now - state.t0}
    log.write(row)
    bar.set_postfix(loss=f"{loss:.3f}", aux=f"{row['aux_balance']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")
    return LogWindow()


def evaluate_and_keep_best(state: TrainState, evaluate: Callable[[], dict], select: str,
                           on_best: Callable[[dict], None], log: "MetricsLog", steps_per_epoch: int, say) -> None:
    """Evaluate, log, and hand a new best (by `select`; "-" prefix: lower is better) to `on_best`."""
    sign, key = (-1, select[1:]) if select.startswith("-") else (1, select)
    metrics = evaluate()
    metrics.update(step=state.step, epoch=state.step / steps_per_epoch, time=state.seconds())
    log.write({k: v for k, v in metrics.items() if not k.startswith("_")})
    if say:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float))
        say(f"step {state.step} (epoch {state.step / steps_per_epoch:.1f}): {shown}")
    if sign * metrics[key] > state.best_score:
        state.best_score, state.best = sign * metrics[key], metrics
        on_best(metrics)


def resume_payload(state: TrainState, optimizer, scheduler, scaler, optimizer_state: dict | None = None) -> dict:
    """What <checkpoint>.last.pt holds beside the weights so that --resume goes on exactly (see restore)."""
    return {"optimizer": optimizer_state or optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": state.step, "consumed": state.consumed, "skipped": state.skipped,
            "best": {k: v for k, v in state.best.items() if not k.startswith("_")},  # plain data, no arrays
            "best_score": state.best_score, "train_seconds": state.seconds(), "rng": rng_state()}


def restore(resume: dict, model: nn.Module, optimizer, scheduler, scaler, batches: Iterator[dict]) -> TrainState:
    """The inverse of resume_payload: weights, optimizer, schedule, clock, data position and RNG."""
    model.load_state_dict(resume["state_dict"])  # expert parallel: each rank takes its experts' slice
    optimizer.load_state_dict(expert_parallel.local_optimizer_state(resume["optimizer"], model, optimizer))
    scheduler.load_state_dict(resume["scheduler"])
    scaler.load_state_dict(resume["scaler"])
    state = TrainState(step=resume["step"], consumed=resume["consumed"], skipped=resume["skipped"],
                       best=resume["best"], best_score=resume["best_score"], t0=time.time() - resume["train_seconds"])
    for _ in range(state.consumed):  # the data stream is seeded: replay its position
        next(batches)
    set_rng_state(resume["rng"])
    return state


def fit(model: nn.Module, cfg: TrainConfig, batches: Iterator[dict], steps_per_epoch: int,
        evaluate: Callable[[], dict], select: str, on_best: Callable[[dict], None], device: torch.device,
        log: MetricsLog, quiet: bool = False, last: tuple[str, Callable[[dict], dict]] | None = None,
        resume: dict | None = None) -> dict:
    """Train until max_steps / epochs / time_budget; evaluate every epoch (or eval_every steps).

    `batches` yields dicts the model takes as keyword arguments, with the targets; the model returns
    (logits, loss, info). One optimizer step uses `accum_steps` batches. `evaluate()` returns metrics; the best
    by `select` (higher is better, e.g. val_acc; prefix "-" for lower is better, e.g. "-val_loss") is passed to
    `on_best` (which writes the checkpoint).

    Under torchrun, the model is wrapped in DistributedDataParallel and `batches` (global batches, the same on
    every rank) are sharded; only rank 0 evaluates, logs and calls `on_best`, and rank 0 decides when to stop.
    With cfg.expert_parallel each rank trains its share of the experts (expert_parallel.py); they are whole
    while rank 0 evaluates and saves, and again when fit returns.

    `last` = (path, payload): after every evaluation, at the end and on Ctrl-C, payload(metrics) plus the
    optimizer, scheduler, scaler, step, RNG and data position is written there; `resume` is that dict loaded
    back, and the run goes on exactly where it stopped. Returns the best evaluation's metrics plus "steps",
    "train_seconds", "skipped_batches" (CUDA out-of-memory batches skipped) and "halted".
    """
    from tqdm import tqdm

    def say(line: str) -> None:  # stderr, above the progress bar (stdout is for the JSON summary)
        tqdm.write(line, file=sys.stderr)

    if cfg.dtype == "fp16" and device.type != "cuda":
        from data import DataError
        raise DataError("--dtype fp16 needs a CUDA device (it runs with a GradScaler); use --dtype bf16 on CPU")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    model.grad_checkpoint = cfg.grad_checkpoint
    rank, world = dist_info()
    main = rank == 0
    quiet = quiet or not main
    net = model  # what the training step calls: the model, or its DDP wrapper
    sharded = world > 1 and cfg.expert_parallel
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        batches = shard(batches, rank, world)
        # each rank's experts are its own: DDP leaves them alone
        own = expert_parallel.shard(model, rank, world) if sharded else []
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, own)
        # an expert or the segment embedding can go unused in a step, which DDP must be told about
        net = DistributedDataParallel(model, find_unused_parameters=True)
    compiling = resolve_compile(cfg.compile, device) == "on"  # until the first compiled step ran
    if compiling and sharded:  # the token exchange has data-dependent sizes
        if not quiet:
            say("note: torch.compile is not used with expert_parallel; training eagerly")
        compiling = False
    eager_net = net
    if compiling:
        net = torch.compile(net)
    optimizer = build_optimizer(model, cfg, device)
    state = TrainState()

    def progress(step: int) -> float:  # the schedule follows whichever ends first: the steps or the clock
        return max(step / total_steps, state.seconds() / cfg.time_budget if cfg.time_budget else 0.0)

    def out_of_time() -> bool:  # rank 0's clock decides for every rank
        return rank0_says(bool(cfg.time_budget) and state.seconds() >= cfg.time_budget)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(progress(step), cfg.warmup_ratio, cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    if resume:
        state = restore(resume, model, optimizer, scheduler, scaler, batches)

    def save_last(optimizer_state: dict | None = None) -> None:
        if last and main and (optimizer_state or not sharded):  # sharded: only inside whole_experts
            path, payload = last
            save_checkpoint(path, {**payload(state.best), "resume": resume_payload(state, optimizer, scheduler,
                                                                                   scaler, optimizer_state)})

    window = LogWindow()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=quiet, dynamic_ncols=True)
    halted, budget_done = False, state.step > 0 and out_of_time()  # a resumed run may have spent it; a new one steps
    try:
        while state.step < total_steps and not budget_done:
            if cfg.halt_after and state.step >= cfg.halt_after:
                halted = True
                break
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            t_step = time.time()
            done = None
            try:
                done = train_step(net, batches, cfg, device, scaler, state, world)
            except torch.OutOfMemoryError:
                if world > 1:
                    raise  # one rank skipping a step the others take would hang them all
            except Exception as e:
                if not compiling:
                    raise
                # compiling happens at the first call: any failure there falls back to the eager model
                net, compiling = eager_net, False
                optimizer.zero_grad(set_to_none=True)
                say(f"warning: torch.compile failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); "
                    "training eagerly")
                continue
            if done is None:  # out of memory; skipped here, where the failed step's tensors are already freed
                skip_out_of_memory(optimizer, device, state, say)
                continue
            loss, infos, tokens = done
            if compiling:
                compiling = False
                if not quiet:
                    say(f"compiled the training step in {time.time() - t_step:.1f} s (the first step)")
            grad_norm = apply_gradients(model, optimizer, scheduler, scaler, cfg.grad_clip, sharded)
            state.step += 1
            window.add(loss, tokens)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                window = log_step(log, bar, state, window, loss, infos, lr, grad_norm, steps_per_epoch, world)
            bar.update(1)
            if cfg.time_budget and state.step % 20 == 0:  # show the steps the clock will allow, not the step cap
                bar.total = min(total_steps, max(state.step, int(state.step * cfg.time_budget /
                                                                 max(state.seconds(), 1e-9))))
            budget_done = out_of_time()
            halting = cfg.halt_after and state.step >= cfg.halt_after
            if state.step % eval_every == 0 or state.step == total_steps or budget_done or halting:
                with expert_parallel.whole_experts(model, optimizer) as optimizer_state:  # all ranks, if sharded
                    if main:
                        evaluate_and_keep_best(state, evaluate, select, on_best, log, steps_per_epoch,
                                               None if quiet else say)
                        save_last(optimizer_state)
                if world > 1:
                    torch.distributed.barrier()  # the other ranks wait while rank 0 evaluates and saves
    except KeyboardInterrupt:
        save_last()  # sharded: the experts cannot be gathered now; the last evaluation's state stays
        if last:
            at = "the last evaluation's" if sharded else f"step {state.step}'s"
            say(f"interrupted at step {state.step}; {at} state is in {last[0]}: add --resume to go on")
        raise
    finally:
        bar.close()
    if sharded:
        expert_parallel.unshard(model)
    if state.skipped:
        say(f"warning: {state.skipped} batch(es) skipped for CUDA out-of-memory")
    return {**state.best, "steps": state.step, "train_seconds": state.seconds(), "skipped_batches": state.skipped,
            "halted": halted}
