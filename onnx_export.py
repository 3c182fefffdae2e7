"""ONNX export (classifier and LM) and an ONNX Runtime session for the classifier.

    python main.py --export onnx                        checkpoints/cls.pt -> checkpoints/cls.onnx
    python main.py --export onnx --task lm              checkpoints/lm.pt -> checkpoints/lm.onnx (sequence logits)
    python main.py --infer --backend onnx --text "..."  classify with ONNX Runtime

The sparse MoE layer exports as it is (torch.export with dynamic batch and sequence axes; the sort-based
dispatch becomes TopK/ArgSort + per-expert slices + ScatterND in the graph), so ONNX Runtime computes exactly
what PyTorch does. The file carries what inference needs besides the weights as metadata: the task, the
tokenizer, the label names and the context length. The seq2seq model does not export (its decoding loops and
KV caches live in Python).
"""
from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from checkpoint import load_trained
from config import Options
from errors import DataError
from fsio import atomic_write
from moe import exporting
from tokenizer import tokenizer_from_dict
from wide import TfidfFeatures

INSTALL_HINT = "pip install onnx onnxscript onnxruntime"
MAX_BATCH = 65536
MAX_FEATURES = 1 << 20


def require(*modules: str):
    """Import optional packages; a missing one is a one-line error with the install command."""
    import importlib
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise DataError(f"ONNX needs the optional package {e.name!r}: {INSTALL_HINT}") from None


def onnx_path(checkpoint: str) -> str:
    """The ONNX file that goes with a checkpoint (the checkpoint itself when it is one)."""
    return checkpoint if checkpoint.endswith(".onnx") else os.path.splitext(checkpoint)[0] + ".onnx"


class LogitsOnly(nn.Module):
    """The graph to export: inputs (passed to the model's forward by name) -> logits, without the loss and the
    logging statistics."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)))[0]


def dynamic_shapes(names: list[str], max_len: int) -> dict:
    """Every input has a dynamic batch axis (up to MAX_BATCH) and a second one: the sequence (up to max_len),
    or for the classifier's TF-IDF rows ("wide_" inputs) the n-grams of the longest text (up to MAX_FEATURES)."""
    # a bounded batch axis keeps the graph's size checks (tokens x top_k) inside int64
    B, T = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("seq", min=1, max=max_len)
    F = torch.export.Dim("features", min=1, max=MAX_FEATURES)
    return {"inputs": tuple({0: B, 1: F if n.startswith("wide_") else T} for n in names)}


def export(task, opts: Options) -> dict:
    """--export onnx: write the ONNX file of --checkpoint, check it against PyTorch, return a summary. The task
    says what the graph's inputs are (Task.export_inputs; a task whose decoding cannot export refuses there)."""
    example = torch.randint(4, 50, (2, 16))  # B, T > 1, so that neither axis is specialised to 1
    task.export_inputs(example)  # a task that does not export refuses here, before anything is loaded
    onnx, ort = require("onnx", "onnxruntime")
    require("onnxscript")
    path = opts.checkpoint
    model, tokenizer, ckpt = load_trained(path, task.name, task.train_hint, torch.device("cpu"))
    if model.config.capacity_factor > 0:
        raise DataError(f"{path}: capacity_factor={model.config.capacity_factor} drops tokens per batch; "
                        "only dropless MoE models export")
    if model.config.routing == "expert" and model.config.num_experts:
        raise DataError(f"{path}: routing='expert' picks tokens across the whole batch (a data-dependent "
                        "top-k); only token-choice MoE models export")
    output = opts.output or onnx_path(path)
    inputs, names = task.export_inputs(example[:, :model.config.max_len], model.config)
    graph = LogitsOnly(model, names).eval()
    with atomic_write(output) as tmp:  # a failed export never leaves a half-written file under the real name
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # not its notes about torchvision ops
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with exporting():
                program = torch.onnx.export(graph, inputs, dynamo=True,
                                            dynamic_shapes=dynamic_shapes(names, model.config.max_len),
                                            input_names=names, output_names=["logits"], verbose=False)
        proto = program.model_proto
        meta = {"task": task.name, "tokenizer": json.dumps(tokenizer.to_dict(), ensure_ascii=False),
                "max_len": str(model.config.max_len), "label_names": json.dumps(ckpt.get("label_names", [])),
                "dtype": ckpt["train_config"].get("dtype", "fp32"),
                "calibration": json.dumps(ckpt.get("calibration", {}))}
        if "wide_features" in ckpt:  # the classifier's TF-IDF vocabulary and IDF: the file stays self-contained
            meta["wide_features"] = json.dumps(TfidfFeatures.from_dict(ckpt["wide_features"]).to_json(),
                                               ensure_ascii=False)
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, tmp)
    # check the file against PyTorch on shapes other than the example's
    session = ort.InferenceSession(output, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for B, T in ((1, 3), (5, model.config.max_len)):
        feeds, _ = task.export_inputs(torch.randint(4, tokenizer.n_vocab, (B, T), generator=gen), model.config)
        with torch.no_grad():
            ref = graph(*feeds).numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(names, feeds)})[0]
        diffs.append(float(np.abs(got - ref).max()))
    return {"task": task.name, "checkpoint": path, "output": output,
            "bytes": os.path.getsize(output), "inputs": names, "max_abs_diff_vs_torch": max(diffs)}


class OnnxClassifier:
    """One ONNX Runtime session for an exported classifier, reused for every call; the tokenizer, label names
    and context length come from the file's metadata."""

    def __init__(self, path: str):
        (ort,) = require("onnxruntime")
        if not os.path.exists(path):
            raise DataError(f"{path}: no ONNX model; export one first with: python main.py --export onnx")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for truncated or foreign files
            raise DataError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("task") != "cls":
            raise DataError(f"{path}: an ONNX export of task {meta.get('task')!r}, not of the classifier")
        self.tokenizer = tokenizer_from_dict(json.loads(meta["tokenizer"]))
        self.names = json.loads(meta["label_names"])
        self.max_len = int(meta["max_len"])
        self.calibration = json.loads(meta.get("calibration", "{}"))
        self.features = TfidfFeatures.from_dict(json.loads(meta["wide_features"])) if "wide_features" in meta else None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def logits(self, batch: dict) -> np.ndarray:
        """batch of tensors from data.collate_cls -> logits (B, classes) as numpy."""
        return self.session.run(None, {name: batch[name].numpy() for name in self.inputs})[0]
