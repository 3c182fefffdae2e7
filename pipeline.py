"""One pipeline for every task: `--train` (fresh, `--resume`, `--init_from`) and `--compare`.

A task module (task_cls, task_lm, task_s2s) gives the pipeline the same small interface:

    NAME, TRAIN_HINT        the task's name, and the command that trains it (for "no checkpoint" errors)
    SELECT                  the validation metric that picks the checkpoint ("-val_loss": lower is better)
    METRICS                 the val_/test_ metrics of the JSON summary and the --compare table
    splits(args, train_cfg)                         -> {"train", "val", "test"}: the built-in data or --data
    new_tokenizer(args, train_cfg, model_cfg, splits) -> a tokenizer trained (or cached) on the training split
    sized(model_cfg, tokenizer, splits)             -> the model config sized to them (vocabulary, classes)
    Data(tokenizer, splits, model_cfg, args, start) -> the splits as the model reads them, with
        .describe()                                 the sizes, for the "model: ..." line
        .extra()                                    what the checkpoint keeps besides the weights (label names)
        .steps_per_epoch(train_cfg), .batches(train_cfg, device)   the training stream
        .evaluate(model, split, train_cfg, device)  -> {"val_...": ...} ("_"-keys stay out of the summary)
        .report(model, rows, test, out_dir)         -> {"loss_curve": png, ...}: plots and prediction files
        .pretrain(model, train_cfg, args, device, payload, resume) (optional: a phase before training,
                                                    the classifier's masked-LM) -> (summary, resume for fit)
        .calibrate(model, test, train_cfg, device)  (optional, after the test split is scored with the best
                                                    checkpoint) -> (what the checkpoint keeps, test metrics)
    baselines(args, train_cfg) (optional)           -> {name: results} added to the --compare table

Adding a task means writing one such module and naming it in main.run (its task table, TASKS) and
models.build_model.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import replace

import numpy as np

import plots
from checkpoint import (checkpoint_payload, last_path, load_checkpoint, load_init, load_resume,
                        save_checkpoint)
from models import build_model, count_params
from trainer import MetricsLog, TrainConfig, fit, is_main_process, run_log, seed_everything


def public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def train(task, model_cfg, train_cfg: TrainConfig, args, device) -> dict:
    """The whole --train run of `task`; returns the summary main.py prints as the last line."""
    t_start = time.time()
    resume = load_resume(args, task.NAME, task.TRAIN_HINT)
    if resume:  # a resumed run is the same run: model, training config and tokenizer come from the saved state
        model_cfg, train_cfg, tokenizer, resume = resume
    seed_everything(train_cfg.seed)
    splits = task.splits(args, train_cfg)
    init = load_init(task.NAME, model_cfg, train_cfg, task.TRAIN_HINT) if resume is None else None
    start = None  # the checkpoint this run starts from: (flag, its saved dict)
    if init:  # upcycling: the dense model's shape and tokenizer; it had its pretraining phase already
        model_cfg, tokenizer, init_state, dense = init
        train_cfg = replace(train_cfg, pretrain_epochs=0)
        start = (f"--init_from {train_cfg.init_from}", dense)
    elif resume is None:
        tokenizer = task.new_tokenizer(args, train_cfg, model_cfg, splits)
        model_cfg = task.sized(model_cfg, tokenizer, splits)
    else:
        start = ("--resume", resume["saved"])
    data = task.Data(tokenizer, splits, model_cfg, args, start)
    model = build_model(task.NAME, model_cfg).to(device)
    if init:
        model.load_state_dict(init_state)
    total, active = count_params(model, model_cfg)
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.quiet:
        print(f"model: {total:,} parameters, {active:,} active per token; tokenizer {tokenizer.kind} "
              f"{tokenizer.n_vocab}; {data.describe()}", file=sys.stderr)

    def payload(metrics: dict, net=model, **extra) -> dict:  # extra: a phase's resume facts
        return checkpoint_payload(task.NAME, net, model_cfg, train_cfg, tokenizer, metrics, **data.extra(), **extra)

    last = last_path(args.checkpoint)
    phase1, fit_resume, fit_extra = {}, resume, {}
    if hasattr(data, "pretrain"):
        phase1, fit_resume = data.pretrain(model, train_cfg, args, device, payload, resume)
        if phase1.pop("_halted"):
            return {"task": task.NAME, "halted": True, "phase": "pretrain", "steps": 0, "last_state": last,
                    **phase1}
        fit_extra = {"phase": "finetune", "phase1": phase1}

    log = run_log(args, task.NAME, model_cfg, train_cfg, append=fit_resume is not None)
    best = fit(model, train_cfg, data.batches(train_cfg, device), data.steps_per_epoch(train_cfg),
               evaluate=lambda: data.evaluate(model, "val", train_cfg, device), select=task.SELECT,
               on_best=lambda m: save_checkpoint(args.checkpoint, payload(m)), device=device, log=log,
               quiet=args.quiet, last=(last, lambda m: payload(m, **fit_extra)), resume=fit_resume)
    summary = {"task": task.NAME, "checkpoint": args.checkpoint, "last_state": last, "out_dir": args.out_dir,
               "params_total": total, "params_active": active, "tokenizer": tokenizer.kind,
               "tokenizer_vocab": tokenizer.n_vocab, **phase1, "steps": best["steps"],
               "skipped_batches": best["skipped_batches"], "train_seconds": round(best["train_seconds"], 3)}
    if best["halted"] or not is_main_process():  # stopped on purpose half-way (the state is saved, the test
        log.close()                                  # split waits for the end), or a rank > 0 under torchrun
        last_loss = next((r["train_loss"] for r in reversed(log.rows) if "train_loss" in r), None)
        return {**summary, "halted": best["halted"], **({"phase": "finetune"} if fit_extra else {}),
                "train_loss": last_loss, **{k: best.get(k) for k in task.METRICS if k.startswith("val_")}}

    # the test split is scored once, with the checkpoint chosen on validation
    ckpt = load_checkpoint(args.checkpoint, task.TRAIN_HINT)
    model.load_state_dict(ckpt["state_dict"])
    test = {k.replace("val_", "test_", 1): v for k, v in data.evaluate(model, "test", train_cfg, device).items()}
    metrics = {**public(best), **public(test)}
    if hasattr(data, "calibrate"):  # fitted on validation, scored on test
        kept, scores = data.calibrate(model, test, train_cfg, device)
        ckpt.update(kept)
        metrics.update(scores)
    ckpt["metrics"] = metrics
    save_checkpoint(args.checkpoint, ckpt)
    outputs = data.report(model, log.rows, test, args.out_dir)
    log.close([p for p in outputs.values() if isinstance(p, str) and p.endswith(".png")])
    speeds = [r["tokens_per_s"] for r in log.rows if "tokens_per_s" in r][1:]  # the first window includes warm-up
    return {**summary, **outputs, "wall_seconds": round(time.time() - t_start, 1),
            "tokens_per_s": round(float(np.mean(speeds))) if speeds else 0, "best_step": best.get("step"),
            **{k: metrics.get(k) for k in task.METRICS}}


# -----------------------------------------------------------------------------
# --compare: the MoE and its dense twin at equal wall-clock

def compare(task, model_cfg, train_cfg: TrainConfig, args, device) -> dict:
    """Train the MoE and the dense model with the same active parameters, on the same split, for the same
    seconds (plus the task's baselines); write compare.md and compare.png."""
    results, curves = train_variants(task, {"moe": model_cfg, "dense": replace(model_cfg, num_experts=0)},
                                     train_cfg, args, device)
    if hasattr(task, "baselines"):
        results.update(task.baselines(args, train_cfg))
    phases = ["pretrain_seconds"] if any("pretrain_seconds" in r for r in results.values()) else []
    table = markdown_table(results, ["params_total", "params_active", *phases, "steps", "train_seconds",
                                     "tokens_per_s", *task.METRICS])
    return write_comparison(table, curves, args.out_dir, task.SELECT.lstrip("-"), results)


def train_variants(task, variants: dict, train_cfg: TrainConfig, args, device) -> tuple[dict, dict]:
    """Run train() once per model-config variant, each in <out_dir>/<name>/ with its own checkpoint.

    The comparison is at equal wall-clock: where the preset stops at a step count, the variants after the first
    train for the seconds the first one took (see same_seconds). Returns ({name: summary}, {name: metrics-log
    rows}) for the comparison table and plot.
    """
    results, curves = {}, {}
    for i, (name, cfg) in enumerate(variants.items()):
        a = copy.copy(args)
        a.out_dir = os.path.join(args.out_dir, name)
        a.checkpoint = os.path.join(args.out_dir, name, "model.pt")
        tcfg = same_seconds(train_cfg, next(iter(results.values()))) if i else train_cfg
        if not args.quiet:
            spent = [f"{new:.0f} s of {phase}" for phase, old, new in (
                ("pretraining", train_cfg.pretrain_seconds, tcfg.pretrain_seconds),
                ("training", train_cfg.time_budget, tcfg.time_budget)) if new != old]
            limit = f", {' and '.join(spent)} as the first variant took" if spent else ""
            print(f"== {name}{limit} ==", file=sys.stderr)
        results[name] = train(task, cfg, tcfg, a, device)
        curves[name] = MetricsLog.read(os.path.join(a.out_dir, "metrics.jsonl"))
    return results, curves


def same_seconds(cfg: TrainConfig, first: dict) -> TrainConfig:
    """The training config of a later --compare variant: a step count of the preset becomes the seconds the
    first variant spent on it (a faster model then makes more steps, as it would in the same wall-clock). At least
    1 ms: a budget of 0 means "no limit", which with 10**6 epochs would never end."""
    if cfg.max_steps and not cfg.time_budget:
        cfg = replace(cfg, max_steps=0, epochs=max(cfg.epochs, 10 ** 6),
                      time_budget=max(first["train_seconds"], 1e-3))
    if cfg.pretrain_steps and not cfg.pretrain_seconds and "pretrain_seconds" in first:
        cfg = replace(cfg, pretrain_steps=0, pretrain_epochs=max(cfg.pretrain_epochs, 10 ** 6),
                      pretrain_seconds=max(first["pretrain_seconds"], 1e-3))
    return cfg


def markdown_table(results: dict, columns: list[str]) -> str:
    """| model | col ... | rows from {name: {col: value}}; floats below 10 (accuracies, losses) to 4 places, larger
    ones (seconds, tokens/s) to 1, missing as '-'."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.4f}"
        return "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r.get(c)) for c in columns) + " |" for name, r in results.items()]
    return "\n".join(lines)


def write_comparison(table: str, curves: dict, out_dir: str, key: str, results: dict) -> dict:
    """Save the table as compare.md, plot `key` against wall-clock as compare.png; return the summary dict."""
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table, file=sys.stderr)
    png = plots.compare_curves(curves, os.path.join(out_dir, "compare.png"), key)
    return {"compare_table": os.path.join(out_dir, "compare.md"), "compare_plot": png,
            **{f"{n}_{k}": v for n, r in results.items() for k, v in r.items()
               if isinstance(v, (int, float)) and not k.startswith("_")}}
