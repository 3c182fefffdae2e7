"""The language-model task: People's Daily (or your text) -> tokenizer -> noisy top-k MoE decoder; generate, eval."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

import plots
from data import DataError, atomic_write_text, news_splits, read_text_lines, tokenizer_cache
from models import MoE, ModelConfig, build_model, count_params
from tokenizer import load_or_train
from checkpoint import checkpoint_payload, last_path, load_checkpoint, load_resume, load_trained, save_checkpoint
from trainer import (TrainConfig, autocast, fit, is_main_process, markdown_table, run_log, seed_everything,
                     train_variants, write_comparison)

TRAIN_HINT = "python main.py --train --task lm"
EVAL_BATCHES = 16  # validation loss is averaged over this many fixed batches


# -----------------------------------------------------------------------------
# Data: one token stream per split, paragraphs separated by <|eos|>

def load_splits(data: str | None, text_col: str, quiet: bool) -> dict:
    if not data:
        return news_splits(quiet=quiet)
    lines = read_text_lines(data, text_col)
    if len(lines) < 20:
        raise DataError(f"{data}: only {len(lines)} non-empty lines; need at least 20 to split 90/5/5 by line")
    a, b = int(len(lines) * 0.9), int(len(lines) * 0.95)
    return {"train": lines[:a], "val": lines[a:b], "test": lines[b:]}


class Stream:
    """A split as one long tensor of token ids, with its character count (for bits per character)."""

    def __init__(self, tokenizer, paragraphs: list[str]):
        ids = []
        for seq in tokenizer.encode_batch(paragraphs):
            ids += seq + [tokenizer.eos_id]
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.chars = sum(len(p) + 1 for p in paragraphs)  # + 1: the paragraph break the eos stands for

    def windows(self, starts, T: int, device):
        x = torch.stack([self.ids[i:i + T] for i in starts])  # (B, T)
        y = torch.stack([self.ids[i + 1:i + T + 1] for i in starts])
        return {"idx": x.to(device), "targets": y.to(device)}


def random_batches(stream: Stream, T: int, B: int, seed: int, device):
    """Endless batches of random contiguous windows of T tokens (targets shifted by one)."""
    g = torch.Generator().manual_seed(seed)
    hi = len(stream.ids) - T - 1
    if hi <= 0:
        raise DataError(f"training text has {len(stream.ids)} tokens, fewer than one window of {T + 1}")
    while True:
        yield stream.windows(torch.randint(0, hi, (B,), generator=g).tolist(), T, device)


@torch.no_grad()
def evaluate(model, stream: Stream, T: int, B: int, device, dtype: str, max_batches: int = EVAL_BATCHES) -> dict:
    """Mean loss over fixed, evenly spaced windows (no dropout, no router noise), and bits per character."""
    model.eval()
    hi = len(stream.ids) - T - 1
    if hi <= 0:
        raise DataError(f"held-out text has {len(stream.ids)} tokens, fewer than one window of {T + 1}")
    n = min(max_batches * B, max(hi // T, 1))
    starts = np.linspace(0, hi, n).astype(int).tolist()
    total = 0.0
    for i in range(0, n, B):
        batch = stream.windows(starts[i:i + B], T, device)
        with autocast(device, dtype):
            _, _, info = model(**batch)
        total += float(info["ce"]) * len(starts[i:i + B])
    loss = total / n
    bpc = loss * (len(stream.ids) / stream.chars) / math.log(2)  # nats per token -> bits per character
    return {"val_loss": loss, "val_bpc": bpc}


# -----------------------------------------------------------------------------
# Training

def train(model_cfg: ModelConfig, train_cfg: TrainConfig, args, device) -> dict:
    t_start = time.time()
    resume = load_resume(args, "lm", TRAIN_HINT)
    if resume:  # a resumed run is the same run: model, training config and tokenizer come from the saved state
        model_cfg, train_cfg, tokenizer, resume = resume
    seed_everything(train_cfg.seed)
    splits = load_splits(args.data, args.text_col, args.quiet)
    if resume is None:
        cache = None if args.data else tokenizer_cache("news", train_cfg.tokenizer, model_cfg.vocab_size)
        tokenizer = load_or_train(train_cfg.tokenizer, splits["train"], model_cfg.vocab_size, cache,
                                  progress=not args.quiet)
        model_cfg = replace(model_cfg, vocab_size=tokenizer.n_vocab)
    streams = {s: Stream(tokenizer, lines) for s, lines in splits.items()}
    model = build_model("lm", model_cfg).to(device)
    total, active = count_params(model, model_cfg)
    os.makedirs(args.out_dir, exist_ok=True)
    T, B = model_cfg.max_len, train_cfg.batch_size
    if not args.quiet:
        sizes = "/".join(f"{len(streams[s].ids):,}" for s in ("train", "val", "test"))
        print(f"model: {total:,} parameters, {active:,} active per token; tokenizer {tokenizer.kind} "
              f"{tokenizer.n_vocab}; train/val/test tokens {sizes}", file=sys.stderr)

    def payload(metrics: dict) -> dict:
        return checkpoint_payload("lm", model, model_cfg, train_cfg, tokenizer, metrics)

    log = run_log(args, "lm", model_cfg, train_cfg, append=resume is not None)
    steps_per_epoch = max(len(streams["train"].ids) // (T * B * train_cfg.accum_steps), 1)
    best = fit(model, train_cfg, random_batches(streams["train"], T, B, train_cfg.seed, device), steps_per_epoch,
               evaluate=lambda: evaluate(model, streams["val"], T, B, device, train_cfg.dtype),
               select="-val_loss", on_best=lambda m: save_checkpoint(args.checkpoint, payload(m)),
               device=device, log=log, quiet=args.quiet, last=(last_path(args.checkpoint), payload), resume=resume)
    if best["halted"] or not is_main_process():  # stopped on purpose half-way (the state is saved, the test
        log.close()                                  # split waits for the end), or a rank > 0 under torchrun
        return {"task": "lm", "halted": best["halted"], "steps": best["steps"],
                "last_state": last_path(args.checkpoint), "val_loss": best.get("val_loss")}

    ckpt = load_checkpoint(args.checkpoint, TRAIN_HINT)
    model.load_state_dict(ckpt["state_dict"])
    test = evaluate(model, streams["test"], T, B, device, train_cfg.dtype)
    metrics = {**{k: v for k, v in best.items() if not k.startswith("_")},
               "test_loss": test["val_loss"], "test_bpc": test["val_bpc"]}
    ckpt["metrics"] = metrics
    save_checkpoint(args.checkpoint, ckpt)

    loss_png = plots.loss_curve(log.rows, os.path.join(args.out_dir, "loss_curve.png"),
                                f"MoE language model ({'dense' if not model_cfg.num_experts else 'MoE'})",
                                quality_keys=("val_bpc",))
    heat_png = None
    loads = [r["expert_load"] for r in log.rows if r.get("expert_load")]
    if loads:
        sample = splits["test"][0][:40]
        heat_png = plots.lm_expert_heatmap(np.asarray(loads).mean(0), *routing_trace(model, tokenizer, sample),
                                           os.path.join(args.out_dir, "expert_heatmap.png"))
    log.close([loss_png, heat_png])
    return {"task": "lm", "checkpoint": args.checkpoint, "out_dir": args.out_dir, "loss_curve": loss_png,
            "expert_heatmap": heat_png, "params_total": total, "params_active": active,
            "tokenizer": tokenizer.kind, "tokenizer_vocab": tokenizer.n_vocab, "steps": best["steps"],
            "train_seconds": round(best["train_seconds"], 1), "wall_seconds": round(time.time() - t_start, 1),
            "tokens_per_s": round(np.mean([r["tokens_per_s"] for r in log.rows if "tokens_per_s" in r][1:] or [0])),
            "val_loss": best.get("val_loss"), "val_bpc": best.get("val_bpc"),
            "test_loss": test["val_loss"], "test_bpc": test["val_bpc"]}


@torch.no_grad()
def routing_trace(model, tokenizer, text: str, forward=None):
    """For one sentence: the token strings and the top-1 expert of each token in each MoE layer (L, T).

    `forward(ids)` runs the part of the model to trace (default: the whole model on the ids)."""
    ids = tokenizer.encode(text)[: model.config.max_len]
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: captured.append((mod, inp[0])))
             for m in model.modules() if isinstance(m, MoE)]
    model.eval()
    try:
        (forward or model)(torch.tensor([ids], device=model.tok_emb.weight.device))
    finally:
        for h in hooks:
            h.remove()
    experts = [mod.route(x.reshape(-1, x.size(-1)))[3][:, 0].cpu().numpy() for mod, x in captured]
    return [tokenizer.decode([i]) for i in ids], np.stack(experts)


# -----------------------------------------------------------------------------
# Using a trained LM

def prompt_ids(tokenizer, prompt: str, max_len: int) -> list[int]:
    """[eos] + the prompt's ids (eos = "a paragraph starts here"), cropped to the context window with a notice."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    if len(ids) > max_len - 1:
        print(f"note: prompt is {len(ids)} tokens; keeping the last {max_len - 1} (the context window)",
              file=sys.stderr)
        ids = ids[-(max_len - 1):]
    return ids


def continuation(model, tokenizer, ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, generator, stop_at_eos: bool = False) -> Iterator[tuple[str, int]]:
    """Yield (new text, tokens so far) as the continuation of `ids` grows, for max_new_tokens tokens.

    End-of-text is the paragraph break of the training text: it yields "\n" and a new paragraph follows, or,
    with `stop_at_eos`, it ends the continuation. Text is yielded in whole characters: a character split across
    tokens waits for its last byte."""
    device = model.tok_emb.weight.device
    out, shown, n = [], "", 0
    eos = tokenizer.eos_id
    for n, tok in enumerate(model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k,
                                           top_p, eos_id=eos if stop_at_eos else None, generator=generator), 1):
        if tok == eos:
            rest = tokenizer.decode(out)[len(shown):]
            out, shown = [], ""
            if stop_at_eos:
                if rest:
                    yield rest, n
                return
            yield rest + "\n", n
            continue
        out.append(tok)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(shown):], n
            shown = text
    rest = tokenizer.decode(out)[len(shown):]
    if rest:
        yield rest, n


def generate(args, device) -> dict:
    """Sample --num_samples continuations of --prompt, printing text as it is produced."""
    model, tokenizer, ckpt = load_trained(args.checkpoint, "lm", TRAIN_HINT, device)
    prompt = args.prompt or ""
    ids = prompt_ids(tokenizer, prompt, model.config.max_len)
    gen = torch.Generator(device=device).manual_seed(args.seed if args.seed is not None else 1337)
    samples = []
    t0, n_tokens = time.time(), 0
    for s in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {s + 1}", flush=True)
        print(prompt, end="", flush=True)
        text, n = "", 0
        for piece, n in continuation(model, tokenizer, ids, args.max_new_tokens, args.temperature,
                                     args.sample_top_k, args.top_p, gen, args.stop_at_eos):
            print(piece, end="", flush=True)
            text += piece
        print(flush=True)
        if n < args.max_new_tokens and not args.quiet:
            print(f"(stopped at end-of-text after {n} of {args.max_new_tokens} tokens: --stop_at_eos)",
                  file=sys.stderr)
        n_tokens += n
        samples.append(prompt + text)
    path = os.path.join(args.out_dir, "generated_text.txt")
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write_text("\n\n".join(samples) + "\n", path)
    seconds = time.time() - t0
    return {"task": "lm", "output": path, "samples": len(samples), "new_tokens": n_tokens,
            "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1)}


def eval_file(args, device) -> dict:
    """Loss and bits per character of a trained LM on any text file (all of it, in windows)."""
    model, tokenizer, ckpt = load_trained(args.checkpoint, "lm", TRAIN_HINT, device)
    stream = Stream(tokenizer, read_text_lines(args.input, args.text_col))
    T = model.config.max_len
    res = evaluate(model, stream, T, 16, device, ckpt["train_config"].get("dtype", "fp32"), max_batches=10 ** 9)
    return {"task": "lm", "input": args.input, "tokens": len(stream.ids), "chars": stream.chars,
            "loss": res["val_loss"], "bpc": res["val_bpc"]}


def compare(model_cfg: ModelConfig, train_cfg: TrainConfig, args, device) -> dict:
    """MoE vs the dense model with the same active parameters, same wall-clock budget, on the same split."""
    results, curves = train_variants(train, {"moe": model_cfg, "dense": replace(model_cfg, num_experts=0)},
                                     train_cfg, args, device)
    table = markdown_table(results, ["params_total", "params_active", "steps", "train_seconds", "tokens_per_s",
                                     "val_loss", "val_bpc", "test_loss", "test_bpc"])
    return write_comparison(table, curves, args.out_dir, "val_loss", results)
