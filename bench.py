"""Benchmarks, separate from training: a readable table, then one JSON line last.

    python bench.py                      # everything below
    python bench.py --only moe           # MoE layer vs dense FFN with the same active parameters
    python bench.py --only train         # training tokens/s per preset, on real batches
    python bench.py --only infer         # single-text latency p50/p99 and batch throughput of a checkpoint
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from models import FeedForward, MoE, ModelConfig


def timed(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_moe(tokens: int = 4096, d: int = 256, hidden: int = 1024, experts: int = 8, k: int = 2) -> dict:
    """Forward + backward of one MoE layer vs the dense FFN with the same active parameters (hidden * k)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d, d_ff=hidden, num_experts=experts, top_k=k, noisy_gate=False, n_heads=4)
    moe, dense = MoE(cfg), FeedForward(d, hidden * k)
    x = torch.randn(tokens // 256, 256, d, requires_grad=True)

    def run_moe():
        y, out = moe(x)
        (y.square().mean() + out.aux_loss).backward()

    def run_dense():
        dense(x).square().mean().backward()

    out = {}
    for dtype in ("fp32", "bf16"):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            t_moe, t_dense = timed(run_moe), timed(run_dense)
        out[f"moe_ms_{dtype}"] = t_moe * 1e3
        out[f"dense_ms_{dtype}"] = t_dense * 1e3
        out[f"moe_over_dense_{dtype}"] = t_moe / t_dense
    return out


def bench_train(presets: list[str], steps: int = 20) -> dict:
    """Training tokens/s of the classifier presets on real review batches (after 3 warm-up steps)."""
    import random
    from types import SimpleNamespace
    import main as cli
    from data import reviews_splits, encode_texts, DATASET_DIR
    from models import build_model
    from task_cls import batch_stream
    from tokenizer import load_or_train
    from trainer import autocast, param_groups
    import os
    out = {}
    splits = reviews_splits(quiet=True)
    for preset in presets:
        args = SimpleNamespace(**{k: None for k in ("epochs", "max_steps", "time_budget", "batch_size", "lr",
                                                    "num_experts", "top_k", "num_layers", "dtype", "seed")}, set=[])
        _, mcfg, tcfg = cli.resolve_config("cls", preset, args)
        tok = load_or_train(tcfg.tokenizer, list(splits["train"].text), mcfg.vocab_size,
                            os.path.join(DATASET_DIR, "reviews", f"{tcfg.tokenizer}_{mcfg.vocab_size}.json"),
                            progress=False)
        mcfg.vocab_size = tok.n_vocab
        model = build_model("cls", mcfg)
        opt = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr)
        seqs = encode_texts(tok, list(splits["train"].text))
        labels = [random.Random(0).randint(0, 1) for _ in seqs]
        batches = batch_stream(tok, seqs, labels, mcfg.max_len, tcfg.batch_size, 0, torch.device("cpu"))
        model.train()
        n_tokens, t0 = 0, 0.0
        for i in range(steps + 3):
            if i == 3:
                n_tokens, t0 = 0, time.perf_counter()
            batch = next(batches)
            with autocast(torch.device("cpu"), tcfg.dtype):
                _, loss, _ = model(**batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n_tokens += int(batch["attention_mask"].sum())
        out[f"train_tokens_per_s_{preset}"] = n_tokens / (time.perf_counter() - t0)
    return out


def bench_infer(checkpoint: str, n: int = 200) -> dict:
    """In-process single-text latency (p50/p99) and batch throughput of a trained classifier."""
    from data import reviews_splits
    from task_cls import Predictor
    p = Predictor(checkpoint, torch.device("cpu"))
    texts = list(reviews_splits(quiet=True)["test"].text)
    lat = []
    for t in texts[:10]:
        p.predict([t])  # warm-up
    for t in texts[:n]:
        t0 = time.perf_counter()
        p.predict([t])
        lat.append(time.perf_counter() - t0)
    lat.sort()
    t0 = time.perf_counter()
    p.predict(texts, batch_size=64)
    batch_s = time.perf_counter() - t0
    return {"infer_p50_ms": lat[len(lat) // 2] * 1e3, "infer_p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3,
            "batch_texts_per_s": len(texts) / batch_s, "infer_checkpoint": checkpoint}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("moe", "train", "infer"), help="run one benchmark")
    ap.add_argument("--presets", default="tiny,default", help="presets for the training benchmark")
    ap.add_argument("--checkpoint", default="checkpoints/cls.pt", help="classifier for the inference benchmark")
    args = ap.parse_args(argv)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.only in (None, "moe"):
        results.update(bench_moe())
    if args.only in (None, "train"):
        results.update(bench_train(args.presets.split(",")))
    if args.only in (None, "infer"):
        import os
        if os.path.exists(args.checkpoint):
            results.update(bench_infer(args.checkpoint))
        else:
            print(f"(skipping inference: no {args.checkpoint}; train with python main.py --train --task cls)",
                  file=sys.stderr)
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
