"""One training loop for every task: AdamW param groups, warmup + cosine schedule, autocast, clipping,
evaluation hook with best-checkpoint selection, a time budget, tqdm progress and a JSONL metrics log.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import expert_parallel
from checkpoint import save_checkpoint
from config import TrainConfig
from distributed import dist_info, mean_over_ranks, rank0_says, shard
from errors import DataError
from moe import MoE
from optim import build_optimizer, lr_factor
from runtime import autocast, check_training_dtype, resolve_compile
from tracking import MetricsLog


# -----------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel, each rank training on its share of every global batch


# -----------------------------------------------------------------------------
# The loop


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


@dataclass
class FitResult:
    """What a training phase returns."""
    best: dict             # the best evaluation's metrics (by `select`)
    steps: int
    train_seconds: float
    skipped_batches: int   # CUDA out-of-memory batches skipped
    halted: bool           # stopped on purpose half-way (halt_after); the resume state is saved


class Checkpointer:
    """The one place a training phase writes to disk: the best model so far (`best_path`, None: not kept) and
    the resume state (`last_path`: the weights plus what resume_payload holds). `payload(metrics)` is the
    checkpoint dict of the model as it is now (configs, tokenizer, weights, metrics, the phase's facts)."""

    def __init__(self, payload: Callable[[dict], dict], best_path: str | None = None, last_path: str | None = None):
        self.payload, self.best_path, self.last_path = payload, best_path, last_path

    def save_best(self, metrics: dict) -> None:
        if self.best_path:
            save_checkpoint(self.best_path, self.payload(metrics), safetensors=True)

    def save_last(self, metrics: dict, resume: dict) -> None:
        if self.last_path:
            save_checkpoint(self.last_path, {**self.payload(metrics), "resume": resume})


class Trainer:
    """One training phase of a model: optimizer, schedule, scaler and state, set up once, then `run` until
    max_steps / epochs / time_budget.

    `batches` yields dicts the model takes as keyword arguments, with the targets; the model returns
    (logits, loss, info). One optimizer step uses `accum_steps` batches. Every epoch (or eval_every steps)
    `evaluate()` returns metrics; a new best by `select` (higher is better, e.g. val_acc; "-" prefix for lower,
    e.g. "-val_loss") goes to the checkpointer, and so does the resume state, after every evaluation, at the end
    and on Ctrl-C; `resume` (that state loaded back) makes the run go on exactly where it stopped.

    Under torchrun the model is wrapped in DistributedDataParallel and the (global, identical on every rank)
    batches are sharded; rank 0 alone evaluates, logs and saves, and decides when to stop. With
    cfg.expert_parallel each rank trains its share of the experts (expert_parallel.py); they are whole while
    rank 0 evaluates and saves, and again when run returns.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, steps_per_epoch: int,
                 log: MetricsLog, checkpointer: Checkpointer, quiet: bool = False):
        check_training_dtype(cfg.dtype, device)  # (main.py asks too, before a run folder is made)
        self.model, self.cfg, self.device, self.log, self.checkpointer = model, cfg, device, log, checkpointer
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.eval_every = cfg.eval_every or steps_per_epoch
        self.rank, self.world = dist_info()
        self.main = self.rank == 0
        self.quiet = quiet or not self.main
        self.sharded = self.world > 1 and cfg.expert_parallel
        self.state = TrainState()

    def say(self, line: str) -> None:
        """stderr, above the progress bar (stdout is for the JSON summary)."""
        tqdm.write(line, file=sys.stderr)

    def setup(self, batches: Iterator[dict], resume: dict | None) -> Iterator[dict]:
        """The network to call (DDP wrapper, compiled), the optimizer, schedule and scaler; `resume` restores
        them. Returns this rank's batches."""
        model, cfg = self.model, self.cfg
        model.grad_checkpoint = cfg.grad_checkpoint
        self.net = model  # what the training step calls: the model, or its DDP wrapper
        if self.world > 1:
            batches = shard(batches, self.rank, self.world)
            # each rank's experts are its own: DDP leaves them alone
            own = expert_parallel.shard(model, self.rank, self.world) if self.sharded else []
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, own)
            # an expert or the segment embedding can go unused in a step, which DDP must be told about
            self.net = DistributedDataParallel(model, find_unused_parameters=True)
        self.compiling = resolve_compile(cfg.compile, self.device) == "on"  # until the first compiled step ran
        if self.compiling and self.sharded:  # the token exchange has data-dependent sizes
            if not self.quiet:
                self.say("note: torch.compile is not used with expert_parallel; training eagerly")
            self.compiling = False
        self.eager_net = self.net
        if self.compiling:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(self.progress(step), cfg.warmup_ratio, cfg.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "fp16")
        if resume:
            self.state = restore(resume, model, self.optimizer, self.scheduler, self.scaler, batches)
        return batches

    def progress(self, step: int) -> float:
        """Where the schedule is: whichever ends first, the steps or the clock."""
        by_clock = self.state.seconds() / self.cfg.time_budget if self.cfg.time_budget else 0.0
        return max(step / self.total_steps, by_clock)

    def out_of_time(self) -> bool:
        """Rank 0's clock decides for every rank."""
        return rank0_says(bool(self.cfg.time_budget) and self.state.seconds() >= self.cfg.time_budget)

    def halting(self) -> bool:
        return bool(self.cfg.halt_after) and self.state.step >= self.cfg.halt_after

    def step(self, batches: Iterator[dict]):
        """One optimizer step -> (loss, infos, tokens, lr, grad norm); None when no step was taken (a batch
        skipped for out-of-memory, or torch.compile failed at its first call and training goes on eagerly)."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t_step = time.time()
        done = None
        try:
            done = train_step(self.net, batches, self.cfg, self.device, self.scaler, self.state, self.world)
        except torch.OutOfMemoryError:
            if self.world > 1:
                raise  # one rank skipping a step the others take would hang them all
        except Exception as e:
            if not self.compiling:
                raise
            # compiling happens at the first call: any failure there falls back to the eager model
            self.net, self.compiling = self.eager_net, False
            self.optimizer.zero_grad(set_to_none=True)
            self.say(f"warning: torch.compile failed ({type(e).__name__}: "
                     f"{(str(e).strip().splitlines() or [''])[0]}); training eagerly")
            return None
        if done is None:  # out of memory; skipped here, where the failed step's tensors are already freed
            self.skip_out_of_memory()
            return None
        loss, infos, tokens = done
        if self.compiling:
            self.compiling = False
            if not self.quiet:
                self.say(f"compiled the training step in {time.time() - t_step:.1f} s (the first step)")
        grad_norm = apply_gradients(self.model, self.optimizer, self.scheduler, self.scaler, self.cfg.grad_clip,
                                    self.sharded)
        self.state.step += 1
        return loss, infos, tokens, lr, grad_norm

    def skip_out_of_memory(self) -> None:
        """Drop a batch that did not fit and go on; a run that fits no batch at all fails loudly instead."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        state = self.state
        state.skipped += 1
        self.say(f"warning: out of memory at step {state.step + 1}; batch skipped ({state.skipped} so far)")
        if state.skipped > 100 and state.skipped > state.step:
            raise DataError(f"out of memory on {state.skipped} batches; lower --batch_size or set "
                            "--set grad_checkpoint=true")

    def evaluate_and_keep_best(self, evaluate: Callable[[], dict], select: str) -> None:
        """Evaluate (rank 0), log, keep a new best (by `select`) and save the resume state."""
        with expert_parallel.whole_experts(self.model, self.optimizer) as optimizer_state:  # all ranks, if sharded
            if self.main:
                state, sign, key = self.state, -1 if select.startswith("-") else 1, select.lstrip("-")
                metrics = evaluate()
                metrics.update(step=state.step, epoch=state.step / self.steps_per_epoch, time=state.seconds())
                self.log.write({k: v for k, v in metrics.items() if not k.startswith("_")})
                if not self.quiet:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                      if k.startswith("val_") and isinstance(v, float))
                    self.say(f"step {state.step} (epoch {state.step / self.steps_per_epoch:.1f}): {shown}")
                if sign * metrics[key] > state.best_score:
                    state.best_score, state.best = sign * metrics[key], metrics
                    self.checkpointer.save_best(metrics)
                self.save(optimizer_state)
        if self.world > 1:
            torch.distributed.barrier()  # the other ranks wait while rank 0 evaluates and saves

    def save(self, optimizer_state: dict | None = None) -> None:
        """The resume state (rank 0; sharded experts: only inside whole_experts, which gathers them)."""
        if self.main and (optimizer_state or not self.sharded):
            self.checkpointer.save_last(self.state.best, resume_payload(
                self.state, self.optimizer, self.scheduler, self.scaler, optimizer_state))

    def run(self, batches: Iterator[dict], evaluate: Callable[[], dict], select: str,
            resume: dict | None = None) -> FitResult:
        """Train to the end of the run (or halt_after); the loop."""
        batches = self.setup(batches, resume)
        state, cfg = self.state, self.cfg
        window = LogWindow()
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train", unit="step", disable=self.quiet,
                   dynamic_ncols=True)
        halted, budget_done = False, state.step > 0 and self.out_of_time()  # a resumed run may have spent it
        try:
            while state.step < self.total_steps and not budget_done:
                if self.halting():
                    halted = True
                    break
                done = self.step(batches)
                if done is None:
                    continue
                loss, infos, tokens, lr, grad_norm = done
                window.add(loss, tokens)
                if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                    window = log_step(self.log, bar, state, window, loss, infos, lr, grad_norm,
                                      self.steps_per_epoch, self.world)
                bar.update(1)
                if cfg.time_budget and state.step % 20 == 0:  # the steps the clock will allow, not the step cap
                    bar.total = min(self.total_steps, max(state.step, int(state.step * cfg.time_budget /
                                                                          max(state.seconds(), 1e-9))))
                budget_done = self.out_of_time()
                if (state.step % self.eval_every == 0 or state.step == self.total_steps or budget_done
                        or self.halting()):
                    self.evaluate_and_keep_best(evaluate, select)
        except KeyboardInterrupt:
            self.save()  # sharded: the experts cannot be gathered now; the last evaluation's state stays
            if self.checkpointer.last_path:
                at = "the last evaluation's" if self.sharded else f"step {state.step}'s"
                self.say(f"interrupted at step {state.step}; {at} state is in {self.checkpointer.last_path}: "
                         "add --resume to go on")
            raise
        finally:
            bar.close()
        if self.sharded:
            expert_parallel.unshard(self.model)
        if state.skipped:
            self.say(f"warning: {state.skipped} batch(es) skipped for CUDA out-of-memory")
        return FitResult(state.best, state.step, state.seconds(), state.skipped, halted)


def fit(model: nn.Module, cfg: TrainConfig, batches: Iterator[dict], steps_per_epoch: int,
        evaluate: Callable[[], dict], select: str, device: torch.device, log: MetricsLog,
        checkpointer: Checkpointer | None = None, quiet: bool = False, resume: dict | None = None) -> FitResult:
    """One phase with a Trainer, for callers that need no more than the result (tests, benchmarks)."""
    trainer = Trainer(model, cfg, device, steps_per_epoch, log, checkpointer or Checkpointer(dict), quiet)
    return trainer.run(batches, evaluate, select, resume)
