"""Checkpoints: one file per model, plain data + tensors, written atomically.

A checkpoint holds the task, the resolved model and training configs, the tokenizer, the weights and the
metrics. A model that is published (a run's best model, checkpoints/<task>.pt) is written as safetensors: the
tensors, and everything else as one JSON string in the file's metadata, so loading it never unpickles anything
(`torch.load`'s weights_only has been bypassed before: CVE-2025-32434, CVE-2026-24747). `<checkpoint>.last.pt`
next to it adds the state that --resume continues from (optimizer moments, RNG states) and stays a torch file,
read with weights_only=True, as do checkpoints written before safetensors; the file's first bytes tell which.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from config import Options, TrainConfig, model_config
from errors import DataError
from fsio import atomic_write
from models import build_model
from moe import upcycle, upcycled_config
from tokenizer import tokenizer_from_dict
from wide import TfidfFeatures

CHECKPOINT_VERSION = 1


TENSOR = "__tensor__"  # in a safetensors checkpoint's JSON: {"__tensor__": name} stands where a tensor was


def save_checkpoint(path: str, payload: dict, safetensors: bool = False) -> None:
    """The payload as a torch file, or with `safetensors` (a published model: no resume state) as safetensors."""
    payload = {"format_version": CHECKPOINT_VERSION, **payload}
    with atomic_write(path) as tmp:  # a crash mid-write leaves the previous checkpoint intact
        if safetensors:
            tensors = {}
            text = json.dumps(split_tensors(payload, "", tensors, set()), ensure_ascii=False, default=plain)
            save_file(tensors, tmp, metadata={"checkpoint": text})
        else:
            torch.save(payload, tmp)


def split_tensors(value, name: str, tensors: dict, seen: set):
    """`value` with each tensor moved into `tensors` under its path (a.b.c) and a {TENSOR: path} left in its
    place. safetensors stores no two tensors on the same memory (tied weights): a second view is copied."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
        return {TENSOR: name}
    if isinstance(value, dict):
        return {k: split_tensors(v, f"{name}.{k}" if name else str(k), tensors, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, f"{name}.{i}", tensors, seen) for i, v in enumerate(value)]
    return value


def plain(value):
    """json.dumps' fallback: numpy scalars as Python numbers; anything else is a bug to hear about."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a checkpoint field of type {type(value).__name__} cannot be written as JSON")


def join_tensors(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def is_safetensors(path: str) -> bool:
    """safetensors: an 8-byte header length, then a JSON header; a torch file is a zip ("PK")."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: str, tensors: bool = True) -> dict:
    """A safetensors checkpoint's dict; without `tensors`, its plain fields only (the weights are not read)."""
    with safe_open(path, framework="pt", device="cpu") as f:
        text = (f.metadata() or {}).get("checkpoint")
        if text is None:
            raise ValueError("no checkpoint metadata")
        plain_fields = json.loads(text)
        return join_tensors(plain_fields, {k: f.get_tensor(k) for k in f.keys()}) if tensors else plain_fields


def checkpoint_meta(path: str) -> dict:
    """A checkpoint's plain fields without reading its weights."""
    if is_safetensors(path):
        return read_safetensors(path, tensors=False)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_checkpoint(path: str, train_hint: str) -> dict:
    if not os.path.exists(path):
        raise DataError(f"{path}: no checkpoint; train one first with: {train_hint}")
    try:
        ckpt = read_safetensors(path) if is_safetensors(path) else torch.load(path, map_location="cpu",
                                                                                weights_only=True)
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
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # a tensor missing, unexpected or of another shape than the config makes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise DataError(f"{path}: its weights do not fit its model config ({lines[1] if len(lines) > 1 else lines[0]})"
                        ) from None
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
