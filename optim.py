"""Optimizers and the schedule: AdamW param groups (no decay on norms, biases, embeddings), Muon for the hidden
matrices of the blocks, warmup + cosine learning rate."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from blocks import Block
from config import TrainConfig
from moe import Experts, MoE


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False, muon_experts: bool = True) -> list[dict]:
    """Decay only the matrices of Linear layers and experts: norms, biases and embeddings are left alone.
    With `muon`, the hidden matrices of the Transformer blocks (attention projections, dense and expert FFN
    weights) form a third group marked "muon"; embeddings, the router (gate, noise) and the heads stay with AdamW,
    as Muon is meant for hidden layers only. Without `muon_experts` the expert stacks stay with AdamW too: they
    are most of an MoE's matrices, and at small batches their Newton-Schulz iterations cost more steps than they
    gain (docs/experiments.md, Step 10)."""

    def is_matrix(module: nn.Module, name: str) -> bool:
        return (isinstance(module, nn.Linear) and name == "weight") or (
            isinstance(module, Experts) and name in ("w_up", "w_down"))

    # the blocks' matrices that stay with AdamW: the router (gate, noise), and the experts without muon_experts
    adamw = {id(p) for m in model.modules() if isinstance(m, MoE)
             for p in (m.gate.weight, *((m.noise.weight,) if m.noise is not None else ()),
                       *(() if muon_experts else (m.experts.w_up, m.experts.w_down)))}
    hidden = {id(p) for block in model.modules() if isinstance(block, Block) for m in block.modules()
              for name, p in m.named_parameters(recurse=False) if is_matrix(m, name) and id(p) not in adamw}
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
    direction, so bf16 is what Muon uses (Jordan et al. 2024; torch.optim.Muon); on an AVX-512 BF16 CPU it
    nearly halves the time of an expert stack's iteration (docs/results.md)."""
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
                 eps: float = 1e-8, ns_steps: int = 5):
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "momentum": momentum, "eps": eps,
                                  "weight_decay": 0.0, "muon": False, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
            if group["muon"]:
                self._muon_step(params, lr, group["momentum"], group.get("ns_steps", 5))  # (older saved states: 5)
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

    def _muon_step(self, params: list[torch.Tensor], lr: float, momentum: float, ns_steps: int) -> None:
        by_shape: dict[tuple, list] = {}  # (A, B) -> [(param, its Nesterov update (..., A, B))]
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - momentum)
            by_shape.setdefault(tuple(p.shape[-2:]), []).append((p, p.grad.lerp(buf, momentum)))
        for (rows, cols), items in by_shape.items():
            stack = torch.cat([u.reshape(-1, rows, cols) for _, u in items])  # (matrices, A, B)
            ortho = orthogonalize(stack, ns_steps, dtype=newton_schulz_dtype(stack.device))
            scale = -lr * 0.2 * math.sqrt(max(rows, cols))
            for (p, _), o in zip(items, ortho.split([p.numel() // (rows * cols) for p, _ in items])):
                p.add_(o.view_as(p).to(p.dtype), alpha=scale)


def build_optimizer(model: nn.Module, cfg: "TrainConfig", device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, muon=cfg.optimizer == "muon", muon_experts=cfg.muon_experts)
    ngram = getattr(model, "ngram", None)
    if ngram is not None and cfg.ngram_lr:  # sparse features: each row sees few batches, so a larger step
        groups = [{**g, "params": [p for p in g["params"] if p is not ngram.weight]} for g in groups]
        groups.append({"params": [ngram.weight], "weight_decay": 0.0, "lr": cfg.ngram_lr})
    if getattr(model, "wide", None) is not None:  # the TF-IDF linear part: frozen (wide_lr 0) or its own step
        wide = [model.wide.weight, model.wide_bias]
        groups = [{**g, "params": [p for p in g["params"] if all(p is not w for w in wide)]} for g in groups]
        for p in wide:
            p.requires_grad_(bool(cfg.wide_lr))
        if cfg.wide_lr:
            groups.append({"params": wide, "weight_decay": 0.0, "lr": cfg.wide_lr})
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, betas=cfg.betas, ns_steps=cfg.muon_steps)
    # fused: one kernel for all parameters instead of ~10 ops per tensor; on CPU several times faster than the
    # per-tensor loop for the seq2seq MoE's 3.0 M parameters, about a tenth of its training step (docs/results.md)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fused)


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` of the run, then cosine down to min_ratio; progress in [0, 1]."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
