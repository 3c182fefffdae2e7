"""One pipeline for every task (task.Task): `--train` (fresh, `--resume`, `--init_from`) and `--compare`."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch.nn as nn

import plots
import runs
from checkpoint import (checkpoint_payload, last_path, load_checkpoint, load_init, load_resume,
                        save_checkpoint)
from config import ENDLESS_EPOCHS, ModelConfig, Options, TrainConfig
from distributed import is_main_process
from fsio import atomic_write_text
from models import build_model, count_params
from runtime import cpu_name, peak_rss_mb, seed_everything
from task import Task, TaskData
from tracking import MetricsLog, run_log
from trainer import Checkpointer, Trainer


def public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


@dataclass
class Run:
    """One --train run, set up: the configs (the saved ones when resuming), the tokenizer, the task's data, the
    model, and where its checkpoints go."""
    task: Task
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: object
    data: TaskData
    model: nn.Module
    resume: dict | None     # the resume state of <checkpoint>.last.pt (--resume)
    checkpoint: str
    last: str               # <checkpoint>.last.pt
    provenance: dict        # version, torch, command line, data fingerprint (runs.provenance)
    run_dir: str

    def payload(self, metrics: dict, net: nn.Module | None = None, **facts) -> dict:
        """The checkpoint of `net` (default: the model) as it is now; `facts`: the phase's resume facts."""
        return checkpoint_payload(self.task.name, net or self.model, self.model_cfg, self.train_cfg, self.tokenizer,
                                  metrics, **self.data.extra(), provenance=self.provenance, run_dir=self.run_dir,
                                  **facts)


def train(task: Task, model_cfg: ModelConfig, train_cfg: TrainConfig, opts: Options, device) -> dict:
    """The whole --train run of `task`; returns the summary main.py prints as the last line."""
    t_start = time.time()
    run = start(task, model_cfg, train_cfg, opts, device)
    setup_seconds = time.time() - t_start  # data read or prepared, tokenizer trained or loaded, model built
    total, active = count_params(run.model, run.model_cfg)
    if not opts.quiet:
        print(f"model: {total:,} parameters, {active:,} active per token; tokenizer {run.tokenizer.kind} "
              f"{run.tokenizer.n_vocab}; {run.data.describe()}", file=sys.stderr)
    earlier, main_resume, halted_in = earlier_phases(run, opts, device)
    if halted_in:
        return {"task": task.name, "halted": True, "phase": halted_in, "steps": 0, "last_state": run.last, **earlier}
    main_facts = {"phase": "finetune", "phase1": earlier} if task.phases(run.train_cfg) else {}
    log = run_log(opts, task.name, run.model_cfg, run.train_cfg, append=main_resume is not None)
    cfg, data, model = run.train_cfg, run.data, run.model
    checkpointer = Checkpointer(lambda m: run.payload(m, **main_facts), run.checkpoint, run.last)
    result = Trainer(model, cfg, device, data.steps_per_epoch(cfg), log, checkpointer, opts.quiet).run(
        data.batches(cfg, device), lambda: data.evaluate(model, "val", cfg, device), task.select, main_resume)
    summary = {"task": task.name, "checkpoint": run.checkpoint, "last_state": run.last, "out_dir": opts.out_dir,
               "params_total": total, "params_active": active, "tokenizer": run.tokenizer.kind,
               "tokenizer_vocab": run.tokenizer.n_vocab, "setup_seconds": round(setup_seconds, 1), **earlier,
               "steps": result.steps,
               "skipped_batches": result.skipped_batches, "train_seconds": round(result.train_seconds, 3)}
    if result.halted or not is_main_process():  # stopped on purpose half-way (the state is saved, the test
        log.close()                                 # split waits for the end), or a rank > 0 under torchrun
        last_loss = next((r["train_loss"] for r in reversed(log.rows) if "train_loss" in r), None)
        return {**summary, "halted": result.halted, **({"phase": "finetune"} if main_facts else {}),
                "train_loss": last_loss, **{k: result.best.get(k) for k in task.metrics if k.startswith("val_")}}
    metrics, outputs = score_on_test(run, result.best, log, opts, device)
    speeds = [r["tokens_per_s"] for r in log.rows if "tokens_per_s" in r][1:]  # the first window includes warm-up
    summary = {**summary, **outputs, "wall_seconds": round(time.time() - t_start, 1), "cpu": cpu_name(),
               "peak_rss_mb": round(peak_rss_mb()),  # the process's, data preparation and evaluation included
               "tokens_per_s": round(float(np.mean(speeds))) if speeds else 0, "best_step": result.best.get("step"),
               **{k: metrics.get(k) for k in task.metrics}}
    return finish(summary, opts)


def finish(summary: dict, opts: Options) -> dict:
    """A finished run: its summary.json (which marks it finished), and its best model published to
    checkpoints/<task>.pt (the model there before stays in its own run folder, or is moved aside)."""
    if opts.publish:
        replaced = runs.publish(opts.checkpoint, opts.publish)
        summary = {**summary, "published": opts.publish, **({"replaced_kept_as": replaced} if replaced else {})}
    atomic_write_text(json.dumps(summary, ensure_ascii=False, indent=1), os.path.join(opts.out_dir, runs.SUMMARY))
    return summary


def start(task: Task, model_cfg: ModelConfig, train_cfg: TrainConfig, opts: Options, device) -> Run:
    """Seed, splits, tokenizer and model: fresh, from --resume's saved state, or upcycled (--init_from)."""
    resume = load_resume(opts, task.name, task.train_hint)
    if resume:  # a resumed run is the same run: model, training config and tokenizer come from the saved state
        model_cfg, train_cfg, tokenizer, resume = resume
    seed_everything(train_cfg.seed)
    splits = task.splits(opts, train_cfg)
    init = load_init(task.name, model_cfg, train_cfg, task.train_hint) if resume is None else None
    origin = None  # the checkpoint this run starts from: (flag, its saved dict)
    if init:  # upcycling: the dense model's shape and tokenizer; it had its pretraining phase already
        model_cfg, tokenizer, init_state, dense = init
        train_cfg = replace(train_cfg, pretrain_epochs=0)
        origin = (f"--init_from {train_cfg.init_from}", dense)
    elif resume is None:
        tokenizer = task.new_tokenizer(opts, train_cfg, model_cfg, splits)
        model_cfg = task.sized(model_cfg, tokenizer, splits)
    else:
        origin = ("--resume", resume["saved"])
    data = task.data(tokenizer, splits, model_cfg, opts, origin)
    model_cfg = data.sized(model_cfg)
    model = build_model(task.name, model_cfg).to(device)
    if init:
        model.load_state_dict(init_state)
    elif resume is None:
        data.init_model(model)
    os.makedirs(opts.out_dir, exist_ok=True)
    if is_main_process():
        atomic_write_text(json.dumps({"task": task.name, "model": asdict(model_cfg), "train": asdict(train_cfg)},
                                     ensure_ascii=False, indent=1), os.path.join(opts.out_dir, runs.CONFIG))
    provenance = runs.provenance(splits, opts.data, opts.command or "main.py", opts.version)
    return Run(task, model_cfg, train_cfg, tokenizer, data, model, resume, opts.checkpoint,
               last_path(opts.checkpoint), provenance, opts.out_dir)


def earlier_phases(run: Run, opts: Options, device) -> tuple[dict, dict | None, str | None]:
    """The phases the task lists before its main one (the classifier's masked-LM), each a Trainer of its own.
    The resume state names the phase it was saved in: an earlier phase resumes there, a finished one is skipped.
    -> (what the summary reports of them, the main phase's resume state, the phase that halted or None)."""
    saved_phase = run.resume["saved"].get("phase") if run.resume else None
    earlier, main_resume = {}, run.resume
    for name in run.task.phases(run.train_cfg):
        if saved_phase == "finetune":  # it ended before the run was interrupted
            earlier.update(run.resume["saved"].get("phase1", {}))
            continue
        resume = run.resume if saved_phase == name else None
        phase = run.task.phase(name, run.model, run.data, run.train_cfg, opts, device, resume=resume is not None)
        checkpointer = Checkpointer(lambda m, net=phase.model, name=name: run.payload(m, net=net, phase=name),
                                    last_path=run.last)
        result = Trainer(phase.model, phase.cfg, device, phase.steps_per_epoch, phase.log, checkpointer,
                         opts.quiet).run(phase.batches, phase.evaluate, phase.select, resume)
        earlier.update(phase.finish(result))
        main_resume = None
        if result.halted:
            return earlier, None, name
    return earlier, main_resume, None


def score_on_test(run: Run, best: dict, log: MetricsLog, opts: Options, device) -> tuple[dict, dict]:
    """The checkpoint chosen on validation, scored once on the test split (and calibrated where the task does);
    its metrics saved into it, the task's plots and predictions written. -> (metrics, report outputs)."""
    cfg, data, model = run.train_cfg, run.data, run.model
    ckpt = load_checkpoint(run.checkpoint, run.task.train_hint)
    model.load_state_dict(ckpt["state_dict"])
    test = {k.replace("val_", "test_", 1): v for k, v in data.evaluate(model, "test", cfg, device).items()}
    metrics = {**public(best), **public(test)}
    kept, scores = data.calibrate(model, test, cfg, device)  # fitted on validation, scored on test
    ckpt.update(kept)
    metrics.update(scores)
    ckpt["metrics"] = metrics
    save_checkpoint(run.checkpoint, ckpt, safetensors=True)
    outputs = data.report(model, log.rows, test, opts.out_dir)
    log.close([p for p in outputs.values() if isinstance(p, str) and p.endswith(".png")])
    return metrics, outputs


# -----------------------------------------------------------------------------
# --compare: the MoE and its dense twin at equal wall-clock

def compare(task, model_cfg, train_cfg: TrainConfig, opts: Options, device) -> dict:
    """Train the MoE and the dense model with the same active parameters, on the same split, for the same
    seconds (plus the task's baselines); write compare.md and compare.png."""
    results, curves = train_variants(task, {"moe": model_cfg, "dense": replace(model_cfg, num_experts=0)},
                                     train_cfg, opts, device)
    results.update(task.baselines(opts, train_cfg))
    phases = ["pretrain_seconds"] if any("pretrain_seconds" in r for r in results.values()) else []
    table = markdown_table(results, ["params_total", "params_active", *phases, "steps", "train_seconds",
                                     "tokens_per_s", *task.metrics])
    return write_comparison(table, curves, opts.out_dir, task.select.lstrip("-"), results)


def train_variants(task, variants: dict, train_cfg: TrainConfig, opts: Options, device) -> tuple[dict, dict]:
    """Run train() once per model-config variant, each in <out_dir>/<name>/ with its own checkpoint.

    The comparison is at equal wall-clock: where the preset stops at a step count, the variants after the first
    train for the seconds the first one took (see same_seconds). Returns ({name: summary}, {name: metrics-log
    rows}) for the comparison table and plot.
    """
    results, curves = {}, {}
    for i, (name, cfg) in enumerate(variants.items()):
        a = replace(opts, out_dir=os.path.join(opts.out_dir, name),
                    checkpoint=os.path.join(opts.out_dir, name, "model.pt"))
        tcfg = same_seconds(train_cfg, next(iter(results.values()))) if i else train_cfg
        if not opts.quiet:
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
    1 ms: a budget of 0 means "no limit", which with ENDLESS_EPOCHS would never end."""
    if cfg.max_steps and not cfg.time_budget:
        cfg = replace(cfg, max_steps=0, epochs=max(cfg.epochs, ENDLESS_EPOCHS),
                      time_budget=max(first["train_seconds"], 1e-3))
    if cfg.pretrain_steps and not cfg.pretrain_seconds and "pretrain_seconds" in first:
        cfg = replace(cfg, pretrain_steps=0, pretrain_epochs=max(cfg.pretrain_epochs, ENDLESS_EPOCHS),
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
