"""Checkpoints: one file per model, plain data + tensors, written atomically, read with weights_only=True.

A checkpoint holds the task, the resolved model and training configs, the tokenizer, the weights and the
metrics; `<checkpoint>.last.pt` next to it adds the state that --resume continues from.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace

import torch
import torch.nn as nn

from config import Options, TrainConfig, model_config
from errors import DataError
from fsio import atomic_write
from models import build_model
from moe import upcycle, upcycled_config
from tokenizer import tokenizer_from_dict
from wide import TfidfFeatures

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str, payload: dict) -> None:
    with atomic_write(path) as tmp:  # a crash mid-write leaves the previous checkpoint intact
        torch.save({"format_version": CHECKPOINT_VERSION, **payload}, tmp)


def load_checkpoint(path: str, train_hint: str) -> dict:
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


def checkpoint_payload(task: str, model: nn.Module, model_cfg, train_cfg, tokenizer, metrics: dict,
                       **extra) -> dict:
    """What every task's checkpoint holds: configs, tokenizer and weights as plain data, the metrics, `extra`."""
    return {"task": task, "model_config": asdict(model_cfg), "train_config": asdict(train_cfg),
            "tokenizer": tokenizer.to_dict(), **extra,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("_")}}


def load_trained(path: str, task: str, train_hint: str, device):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint of `task`."""
    ckpt = load_checkpoint(path, train_hint)
    if ckpt.get("task") != task:
        raise DataError(f"{path}: a {ckpt.get('task')!r} checkpoint, not a {task!r} one")
    model = build_model(task, model_config(task, ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["state_dict"])
    if "wide_features" in ckpt:  # a wide & deep classifier reads each text's TF-IDF row with its own vocabulary
        model.features = TfidfFeatures.from_dict(ckpt["wide_features"])
    return model.eval(), tokenizer_from_dict(ckpt["tokenizer"]), ckpt


def load_resume(opts: Options, task: str, train_hint: str):
    """With --resume: (model config, TrainConfig, tokenizer, resume state for fit) from <checkpoint>.last.pt, the
    run's own configs (halt_after cleared so it runs to the end); None without --resume."""
    if not opts.resume:
        return None
    path = last_path(opts.checkpoint)
    state = load_checkpoint(path, train_hint)
    if state.get("task") != task or "resume" not in state:
        raise DataError(f"{path}: not a resumable {task} run")
    if not opts.quiet:
        print(f"resuming from {path} at step {state['resume']['step']}", file=sys.stderr)
    saved = {k: v for k, v in state.items() if k not in ("resume", "state_dict")}  # the task's own extras too
    return (model_config(task, state["model_config"]), replace(TrainConfig(**state["train_config"]), halt_after=0),
            tokenizer_from_dict(state["tokenizer"]), {**state["resume"], "state_dict": state["state_dict"],
                                                       "saved": saved})


def load_init(task: str, model_cfg, train_cfg, train_hint: str):
    """TrainConfig.init_from (--init_from), sparse upcycling: (the MoE's config on the dense model's shape, the
    dense model's tokenizer, the upcycled weights, the dense checkpoint); None when init_from is unset."""
    path = train_cfg.init_from
    if not path:
        return None
    ckpt = load_checkpoint(path, train_hint)
    if ckpt.get("task") != task:
        raise DataError(f"--init_from {path}: a {ckpt.get('task')!r} checkpoint, not a {task!r} one")
    try:
        cfg = upcycled_config(model_cfg, model_config(task, ckpt["model_config"]))
        model = build_model(task, cfg)
        upcycle(model, ckpt["state_dict"], train_cfg.upcycle_noise, train_cfg.seed)
    except ValueError as e:
        raise DataError(f"--init_from {path}: {e}") from None
    return cfg, tokenizer_from_dict(ckpt["tokenizer"]), model.state_dict(), ckpt


def last_path(checkpoint: str) -> str:
    """Where the resumable state of a run lives: next to its best checkpoint."""
    root, ext = os.path.splitext(checkpoint)
    return f"{root}.last{ext or '.pt'}"
