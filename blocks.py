"""The Transformer block every model is built from: RMSNorm, attention (self or cross, causal or not, rotary
positions, a KV cache for decoding) and the feed-forward part, a dense FFN or the MoE layer; the loss that adds
the MoE's auxiliary losses, and the weight initialisation.

Shapes: B batch, T sequence length, C model width (d_model), H heads, D head width (C // H).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig
from moe import Experts, FeedForward, MoE, MoEOutput, sum_aux


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in float32 so bf16 activations do not lose the mean square; one fused op
        # (bit-identical to the five it replaces in fp32, and ~3 us less a call: a decoding step has nine)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head attention on scaled_dot_product_attention: self or cross, causal or not, optional KV cache.

    `key_mask` (B, Tk) is True on real key positions. `cache` is a dict this layer fills with "k" and "v"
    (B, H, T_past, D); with a cache, a call attends to the past keys plus its own. Self-attention keys and values
    go into buffers allocated once for the whole window (max_len), and "k"/"v" are views of their filled part:
    a decoding step writes one position instead of copying the whole past (torch.cat) again.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.d_model
        self.n_heads = config.n_heads
        self.q_proj = nn.Linear(C, C, bias=False)
        self.kv_proj = nn.Linear(C, 2 * C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.o_proj.residual_out = True  # scaled init, see init_weights
        self.dropout = config.dropout
        self.rope = config.rope
        self.max_len = config.max_len

    def forward(self, x, key_mask=None, causal=False, context=None, cache=None, pos=None):
        """`pos` (T,): absolute positions of the queries, needed with rope (keys of a context sit at 0..S-1)."""
        B, T, C = x.shape
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        if self.rope:
            q = apply_rope(q, pos)
        src = x if context is None else context
        if context is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # cross-attention keys/values are computed once per source
        else:
            k, v = self.kv_proj(src).split(C, dim=-1)
            k = k.view(B, src.size(1), H, C // H).transpose(1, 2)  # (B, H, Tk, D)
            v = v.view(B, src.size(1), H, C // H).transpose(1, 2)
            if self.rope:
                k = apply_rope(k, pos if context is None else torch.arange(src.size(1), device=x.device))
            if cache is not None and context is None:
                k, v = self.append(cache, k, v)
            elif cache is not None:
                cache["k"], cache["v"] = k, v
        Tk = k.size(2)
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :Tk].bool()  # (B, 1, 1, Tk)
        is_causal = causal and T > 1 and T == Tk and mask is None  # SDPA's fused causal kernel
        if causal and T > 1 and not is_causal:
            # query t (at absolute position Tk - T + t) sees keys up to its own position
            causal_mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
            mask = causal_mask if mask is None else mask & causal_mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)

    def append(self, cache: dict, k, v):
        """Write this call's keys and values (B, H, T, D) after the cached ones -> all of them, as views of the
        cache's (B, H, max_len, D) buffers."""
        n, T = cache.get("len", 0), k.size(2)
        if "k_buf" not in cache:
            shape = (k.size(0), k.size(1), max(self.max_len, T), k.size(3))
            cache["k_buf"], cache["v_buf"] = k.new_empty(shape), v.new_empty(shape)
        cache["k_buf"][:, :, n:n + T] = k
        cache["v_buf"][:, :, n:n + T] = v
        cache["len"] = n + T
        cache["k"], cache["v"] = cache["k_buf"][:, :, :n + T], cache["v_buf"][:, :, :n + T]
        return cache["k"], cache["v"]


def reorder_cache(cache: dict, rows) -> None:
    """Beam search: the self-attention cache's sequences (rows of its buffers) to follow the surviving beams."""
    n = cache["len"]
    for buf, view in (("k_buf", "k"), ("v_buf", "v")):
        cache[buf][:, :, :n] = cache[buf][rows, :, :n]
        cache[view] = cache[buf][:, :, :n]


def apply_rope(x, pos):
    """Rotary position embedding (RoFormer): rotate channel pairs of x (B, H, T, D) by angles pos * freq."""
    half = x.size(-1) // 2
    freqs = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (D/2,)
    angles = pos.float()[:, None] * freqs[None]  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)) [+ cross-attn] then x + ffn(norm(x)), ffn dense or MoE."""

    def __init__(self, config: ModelConfig, use_moe: bool, cross: bool = False, causal: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.cross = Attention(config) if cross else None
        self.norm_cross = RMSNorm(config.d_model) if cross else None
        self.norm2 = RMSNorm(config.d_model)
        self.ffn = MoE(config, causal) if use_moe else FeedForward(config.d_model, config.dense_hidden())
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, causal=False, context=None, context_mask=None, cache=None, pos=None):
        """x (B, T, C); mask (B, T) marks real tokens (for keys, and for routing); pos (T,) positions (rope).
        Returns x, MoEOutput|None."""
        self_cache = cache.setdefault("self", {}) if cache is not None else None
        x = x + self.drop(self.attn(self.norm1(x), key_mask=mask, causal=causal, cache=self_cache, pos=pos))
        if self.cross is not None:
            cross_cache = cache.setdefault("cross", {}) if cache is not None else None
            x = x + self.drop(self.cross(self.norm_cross(x), key_mask=context_mask, context=context,
                                         cache=cross_cache, pos=pos))
        h = self.norm2(x)
        if isinstance(self.ffn, MoE):
            # with a KV cache, `mask` covers the past keys too; routing uses only this call's positions
            route_mask = mask[:, -x.size(1):] if mask is not None else None
            y, stats = self.ffn(h, route_mask, decoding=cache is not None)
        else:
            y, stats = self.ffn(h), None
        return x + self.drop(y), stats


def task_loss(logits, labels, stats: list[MoEOutput | None], label_smoothing: float = 0.0):
    """(loss, info): cross-entropy of logits (..., classes) against labels (...; -100 is ignored) plus the
    weighted aux losses of every MoE layer; loss is None without labels. info["ce"] is the plain CE (a tensor)."""
    aux, info = sum_aux(stats, logits.device)
    if labels is None:
        return None, info
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                         label_smoothing=label_smoothing)
    info["ce"] = ce.detach()
    # a dense model has no aux term; adding its constant 0 anyway loses the loss's grad_fn under torch.compile
    # (2.13 folds ce + 0 into ce and then treats the loss as the detached info["ce"])
    return (ce + aux if info["counts"] else ce), info


def run_blocks(blocks: nn.ModuleList, x, checkpointing: bool = False, caches=None, **kwargs):
    """Run a stack of Blocks -> (x, [MoEOutput|None per block]).

    With `checkpointing` in training, each block's activations are recomputed in the backward pass instead of
    kept (torch.utils.checkpoint; the RNG state is replayed, so dropout and router noise match).
    """
    stats = []
    for i, block in enumerate(blocks):
        if checkpointing and block.training and caches is None:
            x, s = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x, s = block(x, cache=caches[i] if caches is not None else None, **kwargs)
        stats.append(s)
    return x, stats


def init_weights(model: nn.Module, num_layers: int):
    """std 0.02 normal init; projections into the residual stream scaled by 1/sqrt(2 * layers) (GPT-2)."""
    resid_std = 0.02 / math.sqrt(2 * max(num_layers, 1))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=resid_std if getattr(m, "residual_out", False) else 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, Experts):
            nn.init.normal_(m.w_up, std=0.02)
            nn.init.normal_(m.w_down, std=resid_std)  # projects into the residual stream
            nn.init.zeros_(m.b_up)
            nn.init.zeros_(m.b_down)
