"""Routing analysis of a trained MoE checkpoint: where each kind of token goes, per layer.

    python main.py --analyze --checkpoint checkpoints/lm.pt [--input FILE]

For every MoE layer, over the real tokens of the inputs (padding is never routed): the share of each expert by
token kind (CJK character, punctuation, digit, Latin, byte fragment, special, other), by predicted class (classifier),
the router's entropy, the coefficient of variation of the expert load, and which experts share a token's
top-k. Inputs: the task's built-in test split (its first ANALYZE_TEXTS texts), or --input (one text a line, or
a table's --text_col; seq2seq: sources, whose decoder side is the model's own greedy conversion).
Writes routing_by_kind.png, routing_cooccurrence.png, routing_load.png (and routing_by_class.png for a
classifier) to --out_dir and returns the numbers for one JSON line.
"""
from __future__ import annotations

import functools
import math
import unicodedata
from collections import defaultdict

import numpy as np
import torch

import plots
from checkpoint import load_checkpoint, load_trained
from config import Options
from errors import DataError
from moe import MoE, Routing

ANALYZE_TEXTS = 1000  # texts of the built-in test split analysed by default
TOKEN_KINDS = ("CJK", "punctuation", "digit", "Latin", "byte fragment", "special", "other")


def token_kind(piece: str) -> str:
    """The kind of a token (one of TOKEN_KINDS) by its text: special when it has none, a byte fragment when it
    is not whole UTF-8 (decodes to U+FFFD), else by its first non-space character."""
    if not piece:
        return "special"  # [CLS], <eos>, ...: no text
    if "\ufffd" in piece:
        return "byte fragment"
    text = piece.strip()
    if not text:
        return "other"  # whitespace
    c = text[0]
    if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff":
        return "CJK"
    if c.isdigit():
        return "digit"
    if c.isascii() and c.isalpha():
        return "Latin"
    if unicodedata.category(c)[0] in "PS":
        return "punctuation"
    return "other"


def checkpoint_task(path: str) -> str:
    """The task a checkpoint was trained for (so --analyze needs no --task)."""
    return load_checkpoint(path, "python main.py --train --task cls|lm|seq2seq").get("task", "cls")


class RoutingStats:
    """Running counts for one MoE layer: assignments by token kind / class, top-k pairs, router entropy."""

    def __init__(self, num_experts: int, num_classes: int):
        E = num_experts
        self.by_kind = defaultdict(lambda: np.zeros(E, dtype=np.int64))  # kind -> assignments per expert
        self.kind_tokens = defaultdict(int)
        self.by_class = np.zeros((num_classes, E), dtype=np.int64)
        self.class_tokens = np.zeros(num_classes, dtype=np.int64)
        self.pairs = np.zeros((E, E), dtype=np.int64)
        self.entropy_sum, self.tokens = 0.0, 0

    def add(self, probs: torch.Tensor, chosen: torch.Tensor, kinds: list[str], classes: np.ndarray | None):
        """probs (N, E) and chosen (N, E) (1 where the expert computed the token) for N routed tokens, their
        kinds (N,) and classes (N,) or None."""
        E = probs.size(1)
        self.entropy_sum += float(-(probs * probs.clamp_min(1e-12).log()).sum())
        self.tokens += probs.size(0)
        onehot = chosen.numpy()
        for kind in set(kinds):
            rows = np.fromiter((k == kind for k in kinds), dtype=bool, count=len(kinds))
            self.by_kind[kind] += onehot[rows].sum(0).astype(np.int64)
            self.kind_tokens[kind] += int(rows.sum())
        if classes is not None:
            np.add.at(self.by_class, classes, onehot.astype(np.int64))
            np.add.at(self.class_tokens, classes, 1)
        self.pairs += (onehot.T @ onehot).astype(np.int64) * (1 - np.eye(E, dtype=np.int64))

    def summary(self, name: str, class_names: list[str] | None) -> dict:
        load = sum(self.by_kind.values())  # (E,) assignments per expert
        E = len(load)
        share = load / max(load.sum(), 1)
        pairs = [(int(self.pairs[i, j]), i, j) for i in range(E) for j in range(i + 1, E)]
        top = sorted(pairs, reverse=True)[:3]
        out = {"layer": name, "tokens": self.tokens,
               "entropy": round(self.entropy_sum / max(self.tokens, 1), 4),
               "entropy_max": round(math.log(E), 4),
               "load_cv": round(float(load.std() / max(load.mean(), 1e-12)), 4),
               "load_share": [round(float(s), 4) for s in share],
               # share: the fraction of the kind's tokens each expert computed (top_k per token in all)
               "by_kind": {k: {"tokens": self.kind_tokens[k],
                               "share": [round(float(x), 4) for x in v / max(self.kind_tokens[k], 1)]}
                           for k, v in sorted(self.by_kind.items(), key=lambda kv: -kv[1].sum())},
               "top_pairs": [{"experts": [i, j], "share_of_tokens": round(n / max(self.tokens, 1), 4)}
                             for n, i, j in top if n]}
        if class_names is not None:
            out["by_class"] = {c: [round(float(x), 4) for x in row / max(n, 1)]
                               for c, row, n in zip(class_names, self.by_class, self.class_tokens)}
        return out


class Recorder:
    """Every MoE layer's routing as the layer computed it (through its `tap`): the router's probabilities and
    choices for the tokens it routes, with their positions, so each can be matched to its token id."""

    def __init__(self, model):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.calls = []  # (layer name, Routing, positions (N,) of the routed tokens in the flattened input, the
        # input's shape less the width: (B, T) or (B,))
        for name, m in self.layers:
            m.tap = functools.partial(self.record, name)

    def record(self, name: str, r: Routing, rows, shape) -> None:
        rows = rows if rows is not None else torch.arange(r.probs.size(0), device=r.probs.device)
        self.calls.append((name, r, rows, tuple(shape)))

    def routings(self) -> list:
        """The calls since the last one: [(layer name, Routing, positions, shape)]."""
        calls, self.calls = self.calls, []
        return calls

    def take(self) -> list:
        """The calls since the last one: [(layer name, probs (N, E), chosen (N, E) 1 where an expert took the
        token, positions (N,), shape)], on the CPU."""
        return [(name, r.probs.float().cpu(), r.per_token(torch.ones_like(r.weight)).cpu(), rows.cpu(), shape)
                for name, r, rows, shape in self.routings()]

    def close(self):
        for _, m in self.layers:
            m.tap = None


@torch.no_grad()
def analyze(task, opts: Options, device) -> dict:
    """--analyze: route the task's texts (task.analysis_texts) through the checkpoint's model, layer by layer."""
    path = opts.checkpoint
    model, tokenizer, ckpt = load_trained(path, task.name, task.train_hint, device)
    if not model.config.num_experts:
        raise DataError(f"{path}: a dense model (num_experts 0): no routing to analyse")
    texts = task.analysis_texts(opts, model, tokenizer, device)
    class_names = ckpt.get("label_names")  # the classifier's: routing by predicted class too
    recorder = Recorder(model)
    stats = {name: RoutingStats(model.config.num_experts, len(class_names or [])) for name, _ in recorder.layers}
    pieces = {}  # token id -> kind

    def kind_of(i: int) -> str:
        if i not in pieces:
            pieces[i] = token_kind(tokenizer.decode([i]))
        return pieces[i]

    try:
        for inputs, ids_by_stack in task.analysis_batches(model, tokenizer, texts, device):
            out = model(*inputs)
            classes = out[0].argmax(-1).cpu().numpy() if class_names else None  # the predicted class
            for name, probs, chosen, rows, shape in recorder.take():
                stack = next((s for s in ids_by_stack if s and name.startswith(s)), "")
                ids = ids_by_stack[stack]
                if tuple(shape) == tuple(ids.shape):  # token positions
                    flat = ids.reshape(-1).cpu()[rows].tolist()
                    kinds = [kind_of(i) for i in flat]
                    row_of = (rows // shape[1]).numpy()
                else:  # the pooled classifier routes one vector per text
                    kinds, row_of = ["whole text"] * len(rows), rows.numpy()
                stats[name].add(probs, chosen, kinds, classes[row_of] if classes is not None else None)
    finally:
        recorder.close()
    layers = [s.summary(name, class_names) for name, s in stats.items()]
    pngs = plots.routing_report(layers, model.config.num_experts, opts.out_dir,
                                {name: s.pairs / max(s.tokens, 1) for name, s in stats.items()})
    return {"task": "analyze", "checkpoint": path, "model_task": task.name, "texts": len(texts),
            "inputs": opts.input or f"built-in test split (first {len(texts)})", **pngs, "layers": layers,
            "provenance": ckpt.get("provenance")}


@torch.no_grad()
def routing_trace(model, tokenizer, text: str, forward=None):
    """For one sentence: the token strings and the top-1 expert of each token in each MoE layer (L, T).

    `forward(ids)` runs the part of the model to trace (default: the whole model on the ids)."""
    ids = tokenizer.encode(text)[: model.config.max_len]
    recorder = Recorder(model)
    model.eval()
    try:
        (forward or model)(torch.tensor([ids], device=model.tok_emb.weight.device))
        experts = [top_expert(r).cpu().numpy() for _, r, _, _ in recorder.routings()]
    finally:
        recorder.close()
    return [tokenizer.decode([i]) for i in ids], np.stack(experts)


def top_expert(r: Routing) -> torch.Tensor:
    """(N,) the expert giving each token its largest combine weight; -1 where no expert took it (expert choice)."""
    weights = r.per_token(r.weight)  # (N, E)
    return torch.where(weights.sum(1) > 0, weights.argmax(1), -1)


@torch.no_grad()
def token_routing(task, model, tokenizer, text: str, device, top: int = 3) -> dict:
    """One text's routing, token by token, in every MoE layer: for the page's routing view. -> {"tokens": [...],
    "layers": [{"layer": name, "experts": [[[expert, probability], ...] per token: its `top` likeliest experts,
    "chosen": [[experts that took it] per token]}]} (the classifier's pooled layers route one vector: no rows)."""
    if not model.config.num_experts:
        return {"tokens": [], "layers": []}
    model.eval()
    recorder = Recorder(model)
    try:
        (inputs, ids_by_stack), = task.analysis_batches(model, tokenizer, task.routing_input(text), device)
        model(*inputs)
        calls = recorder.take()
    finally:
        recorder.close()
    ids = ids_by_stack.get("", ids_by_stack.get("encoder"))[0].tolist()
    layers = []
    for name, probs, chosen, rows, shape in calls:
        if len(shape) != 2 or (ids_by_stack.get("decoder") is not None and name.startswith("decoder")):
            continue  # a pooled layer, or the decoder (the page shows what the user typed)
        weights, experts = probs.topk(min(top, probs.size(1)), dim=1)
        by_pos = {int(r): i for i, r in enumerate(rows)}
        layers.append({"layer": name, "experts": [
            [[int(e), round(float(w), 3)] for e, w in zip(experts[by_pos[p]], weights[by_pos[p]])] if p in by_pos
            else [] for p in range(len(ids))],
            "chosen": [chosen[by_pos[p]].nonzero().flatten().tolist() if p in by_pos else [] for p in range(len(ids))]})
    return {"tokens": [tokenizer.decode([i]) for i in ids], "layers": layers}
