"""The MoE core, the shared Transformer block, and the task models.

Shapes: B batch, T sequence length, C model width (d_model), E experts, K experts per token (top_k),
N tokens routed (B*T minus padding), H heads, D head width (C // H).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Configs

@dataclass
class MoEConfig:
    """The MoE layer's fields, shared by every model's config."""
    num_experts: int = 8          # 0: dense FFN, same *active* parameters (hidden = (top_k + shared_experts) * d_ff)
    top_k: int = 2
    shared_experts: int = 0       # experts every token goes through besides its top_k routed ones (DeepSeekMoE)
    moe_layers: str = "all"       # "all", "none", "odd" (1, 3, ...) or a comma list of layer indices
    noisy_gate: bool = True       # noisy top-k (Shazeer et al. 2017); noise only in training mode
    noise_init: float = 0.05      # router noise std at init; log(2) is Shazeer's (zero-init softplus), which
                                  # drowns the initial logits (std ~0.23) and slows early learning
    norm_topk_prob: bool = True   # renormalise the K router weights to sum to 1 (never for top_k=1)
    capacity_factor: float = 0.0  # 0: dropless; else each expert keeps ceil(cf * N * K / E) assignments
    routing: str = "token"        # "token": each token picks its top_k experts; "expert": expert choice (Zhou et
                                  # al. 2022), each expert picks its top ceil(N * top_k / E) tokens of the batch:
                                  # balanced by construction, but a token's experts depend on the other tokens,
                                  # so encoders only (the classifier, the seq2seq encoder; refused for the LM)
    balance: str = "loss"         # how experts are kept busy alike: "loss" (the Switch loss below) or "bias"
                                  # (auxiliary-loss-free: a per-expert bias on the selection scores, see MoE)
    bias_rate: float = 0.001      # balance="bias": the bias step per optimizer step (Wang et al. 2024's u)
    balance_coef: float = 0.01    # Switch-Transformer load-balancing loss weight (balance="loss")
    z_coef: float = 0.001         # router z-loss weight (ST-MoE)
    moe_impl: str = "auto"        # expert computation: "grouped" (F.grouped_mm), "loop" (per expert, the
                                  # reference) or "auto" (measured choice by batch size, see Experts)


@dataclass
class ModelConfig(MoEConfig):
    """What every model has: the Transformer's shape and the MoE fields. Each task's model has its own
    subclass below with only the fields it reads; all are stored in the checkpoint (dataclasses.asdict)."""
    vocab_size: int = 4096        # BPE target size (256 bytes + merges + specials); set from the tokenizer
    max_len: int = 128            # longest sequence, [CLS] and [SEP] included
    d_model: int = 128
    n_heads: int = 4
    num_layers: int = 2           # 0 (classifier): pooled embeddings -> one MoE layer -> head
    d_ff: int = 256               # hidden width of one expert
    dense_ff: int = 0             # hidden width of the dense FFN layers (0: (top_k + shared_experts) * d_ff, the
                                  # active width of an MoE layer; upcycling sets it to the dense model's width)
    dropout: float = 0.1
    rope: ClassVar[bool] = False  # rotary positions: a field of the seq2seq model only

    def __post_init__(self):
        for name, lo in (("vocab_size", 1), ("max_len", 2), ("d_model", 1), ("n_heads", 1), ("d_ff", 1),
                         ("dense_ff", 0), ("num_layers", 0), ("num_experts", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {lo}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts={self.shared_experts} must be >= 0")
        if self.noisy_gate and not self.noise_init > 0:
            raise ValueError(f"noise_init={self.noise_init} must be > 0 (or set noisy_gate=false)")
        if self.balance not in ("loss", "bias"):
            raise ValueError(f"balance={self.balance!r} must be 'loss' or 'bias'")
        if self.routing not in ("token", "expert"):
            raise ValueError(f"routing={self.routing!r} must be 'token' or 'expert'")
        if self.routing == "expert" and self.balance == "bias":
            raise ValueError("routing='expert' is balanced by construction (every expert takes the same number of "
                             "tokens); balance='bias' is for routing='token'")
        if not (math.isfinite(self.bias_rate) and self.bias_rate >= 0):
            raise ValueError(f"bias_rate={self.bias_rate} must be a number >= 0")
        if self.moe_impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"moe_impl={self.moe_impl!r} must be 'auto', 'grouped' or 'loop'")
        for name in ("capacity_factor", "balance_coef", "z_coef"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)} must be a number >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.moe_layers not in ("all", "none", "odd"):
            indices = [i.strip() for i in self.moe_layers.split(",")]
            if not all(i.isdigit() and int(i) < self.depth() for i in indices):
                raise ValueError(f"moe_layers={self.moe_layers!r} must be all, none, odd or layer indices "
                                 f"below {self.depth()} like 0,2")

    def depth(self) -> int:
        """The deepest stack's number of blocks (what moe_layers indexes)."""
        return self.num_layers

    def dense_hidden(self) -> int:
        """Hidden width of a dense FFN layer: by default an MoE layer's active width, so a dense twin
        (num_experts=0) has the same active parameters per token."""
        return self.dense_ff or self.d_ff * (self.top_k + self.shared_experts)

    def is_moe_layer(self, i: int) -> bool:
        if self.num_experts == 0 or self.moe_layers == "none":
            return False
        if self.moe_layers == "all":
            return True
        if self.moe_layers == "odd":
            return i % 2 == 1
        return i in {int(j) for j in self.moe_layers.split(",")}


@dataclass
class ClassifierConfig(ModelConfig):
    """The MiniBERT-MoE classifier (--task cls)."""
    pooling: str = "cls"          # "cls" (the [CLS] position) or "mean" (over real tokens)
    ngram_buckets: int = 0        # a linear "wide" part over hashed token 1-3-grams, added to the logits
                                  # (fastText / wide & deep); this many hash buckets (0: none)
    num_classes: int = 2
    type_vocab_size: int = 2      # segment embeddings (sentence A / B)

    def __post_init__(self):
        super().__post_init__()
        for name, lo in (("num_classes", 1), ("ngram_buckets", 0), ("type_vocab_size", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {lo}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling={self.pooling!r} must be 'cls' or 'mean'")


@dataclass
class LMConfig(ModelConfig):
    """The decoder-only language model (--task lm): causal by construction, no fields of its own."""

    def __post_init__(self):
        super().__post_init__()
        if self.routing == "expert":
            raise ValueError("routing='expert' (expert choice) lets a token's experts depend on the tokens after "
                             "it, which a causal language model must not see; use routing='token'")


@dataclass
class Seq2SeqConfig(ModelConfig):
    """The encoder-decoder (--task seq2seq); num_layers is the encoder's depth."""
    decoder_layers: int = 0       # decoder depth (0: same as num_layers); its MoE layers route by token
                                  # choice whatever `routing` says (expert choice would see future tokens)
    rope: bool = False            # rotary positions in self- and cross-attention instead of position tables, so
                                  # "target t looks at source t" is one relative pattern to learn

    def __post_init__(self):
        if self.decoder_layers < 0:
            raise ValueError(f"decoder_layers={self.decoder_layers} must be >= 0")
        super().__post_init__()

    def depth(self) -> int:
        return max(self.num_layers, self.decoder_layers)


MODEL_CONFIGS = {"cls": ClassifierConfig, "lm": LMConfig, "seq2seq": Seq2SeqConfig}


def model_config(task: str, values: dict) -> ModelConfig:
    """A checkpoint's saved model config as its task's config class. Checkpoints written while one config
    served every model carry the other models' fields (and a dead `causal`); this model never read them, so
    they are dropped."""
    cls = MODEL_CONFIGS[task]
    own = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in own})


# -----------------------------------------------------------------------------
# Building blocks

_exporting = False  # True while onnx_export traces a model (see exporting())


@contextlib.contextmanager
def exporting():
    """While tracing for ONNX: MoE layers return their output only and run the per-expert loop. A flag of our
    own, not torch.compiler.is_exporting(): torch 2.11 also answers True inside torch.compile, which silently
    dropped the aux losses and expert counts of compiled training."""
    global _exporting
    _exporting = True
    try:
        yield
    finally:
        _exporting = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 so bf16 activations do not lose the mean square
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head attention on scaled_dot_product_attention: self or cross, causal or not, optional KV cache.

    `key_mask` (B, Tk) is True on real key positions. `cache` is a dict this layer fills with "k" and "v"
    (B, H, T_past, D); with a cache, a call attends to the past keys plus its own.
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
            if cache is not None:
                if context is None and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
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


def apply_rope(x, pos):
    """Rotary position embedding (RoFormer): rotate channel pairs of x (B, H, T, D) by angles pos * freq."""
    half = x.size(-1) // 2
    freqs = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (D/2,)
    angles = pos.float()[:, None] * freqs[None]  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class FeedForward(nn.Module):
    """The dense FFN (and the shared experts): C -> hidden -> C with GELU. Routed experts: Experts."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)
        self.down.residual_out = True

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Experts(nn.Module):
    """E FeedForward experts as stacked weights, one parameter per projection for all experts:
    w_up (E, C, H), b_up (E, H), w_down (E, H, C), b_down (E, C). Expert e computes
    gelu(x @ w_up[e] + b_up[e]) @ w_down[e] + b_down[e], the function of FeedForward(C, H).

    Input: the M assignments sorted by expert (xs (M, C), `counts` (E,) rows each, expert_ids (M,)).
    impl "grouped": two F.grouped_mm calls and one GELU for all experts, so the Python op count does not grow
    with E (on CPU grouped_mm still makes one BLAS mm per expert inside: 48 of a layer's 54 mm calls in forward
    and backward at E 8, profiled 2026-12-02; what is saved is the dispatch around them).
    impl "loop": one addmm pair per expert on its slice (bias fused); the reference, and the path taken while
    exporting (ONNX has no grouped matmul) and on CUDA outside bf16 (grouped_mm's CUDA kernels
    want bf16). impl "auto" (default): "loop" on CPU once the average expert gets >= 1,024 rows, else
    "grouped". Measured with `bench.py --only moe` (2-core AMD EPYC, AVX2, fp32, C 128, H 256, top-2, layer
    fwd+bwd, MoE time / dense FFN time): 320 tokens E 4/8/16 grouped 2.9/2.4/2.5 vs loop 3.1/3.5/6.6;
    1,024 tokens 1.6/2.0/2.9 vs 2.1/3.0/4.6; 4,096 tokens 1.5/1.8/1.7 vs 1.5/1.5/2.3. A padded
    (E, capacity, C) buffer + two bmm lost to both once it pads (uneven loads).
    Under expert choice every expert has exactly `capacity` rows, so xs is an (E, capacity, C) batch with no
    padding: two baddbmm (biases fused) for all experts, whatever impl says unless "loop". Seq2seq encoder shape
    (16 x 20 tokens, 240 real, E 8, top-2, fwd+bwd, 2026-12-02): 5.4-5.9 ms vs 6.3-8.0 ms grouped in two runs;
    the dense FFN 3.0 ms.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, impl: str = "auto"):
        super().__init__()
        E, C, H = num_experts, d_model, hidden
        self.num_experts, self.impl = E, impl
        # nn.Linear's default init, per expert (init_weights replaces it in the task models)
        up_bound, down_bound = 1 / math.sqrt(C), 1 / math.sqrt(H)
        self.w_up = nn.Parameter(torch.empty(E, C, H).uniform_(-up_bound, up_bound))
        self.b_up = nn.Parameter(torch.empty(E, H).uniform_(-up_bound, up_bound))
        self.w_down = nn.Parameter(torch.empty(E, H, C).uniform_(-down_bound, down_bound))
        self.b_down = nn.Parameter(torch.empty(E, C).uniform_(-down_bound, down_bound))

    def forward(self, xs, counts, expert_ids, capacity: int | None = None):
        """xs (M, C) grouped by expert, counts (E,), expert_ids (M,) -> (M, C) in the compute dtype.
        `capacity`: every expert has exactly this many rows (expert choice), so xs is an (E, capacity, C) batch."""
        if _exporting:  # ONNX has no grouped matmul; and no branching on symbolic sizes
            return self._loop(xs, counts)
        dtype = xs.dtype
        if torch.is_autocast_enabled(xs.device.type):  # grouped_mm has no autocast rule: cast by hand
            dtype = torch.get_autocast_dtype(xs.device.type)
        if capacity is not None and self.impl != "loop":  # every expert has `capacity` rows: no padding
            return self._batched(xs.to(dtype), capacity)
        impl = self.impl
        if impl == "auto":  # CPU: many rows per expert make the per-expert addmm (bias fused) the faster one
            impl = "loop" if (xs.device.type == "cpu" and xs.size(0) >= 1024 * self.num_experts
                              and not torch.compiler.is_compiling()) else "grouped"  # compiled: static shapes
        grouped = impl == "grouped" and (xs.device.type == "cpu" or dtype == torch.bfloat16)
        if grouped:
            if xs.device.type == "cpu" and torch.compiler.is_compiling():
                # Inductor has no CPU lowering for fp32 grouped_mm ("Expected inputs of BF16"): run the experts
                # eagerly inside the compiled model (static in shape, so one graph break, no recompiles)
                return torch.compiler.disable(self._grouped)(xs.to(dtype), counts, expert_ids, dtype)
            return self._grouped(xs.to(dtype), counts, expert_ids, dtype)
        return self._loop(xs, counts)

    def _grouped(self, xs, counts, expert_ids, dtype):
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        # biases by index_select, whose backward is one index_add (x[idx]'s is a serial sorting index_put)
        h = F.grouped_mm(xs, self.w_up.to(dtype), offs=offs) + self.b_up.to(dtype).index_select(0, expert_ids)
        y = F.grouped_mm(F.gelu(h), self.w_down.to(dtype), offs=offs)  # (M, C)
        return y + self.b_down.to(dtype).index_select(0, expert_ids)

    def _batched(self, xs, capacity):
        x = xs.view(self.num_experts, capacity, xs.size(-1))  # (E, cap, C)
        dtype = xs.dtype
        h = torch.baddbmm(self.b_up.to(dtype)[:, None], x, self.w_up.to(dtype))  # (E, cap, H), bias fused
        y = torch.baddbmm(self.b_down.to(dtype)[:, None], F.gelu(h), self.w_down.to(dtype))  # (E, cap, C)
        return y.view(-1, y.size(-1))

    def _loop(self, xs, counts):
        # an exported graph cannot branch on data-dependent sizes: there every expert runs, even on 0 rows
        parts = [torch.addmm(self.b_down[e], F.gelu(torch.addmm(self.b_up[e], chunk, self.w_up[e])), self.w_down[e])
                 for e, chunk in enumerate(xs.split(counts.tolist())) if _exporting or chunk.size(0)]
        return torch.cat(parts) if parts else xs  # xs is (0, C) when no token was routed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also load checkpoints written before the stacked layout: one FeedForward per expert,
        `experts.<e>.up.weight` (H, C) ... -> w_up (E, C, H) ..."""
        if f"{prefix}0.up.weight" in state_dict:
            for new, old in (("w_up", "up.weight"), ("b_up", "up.bias"), ("w_down", "down.weight"),
                             ("b_down", "down.bias")):
                per_expert = [state_dict.pop(f"{prefix}{e}.{old}") for e in range(self.num_experts)
                              if f"{prefix}{e}.{old}" in state_dict]
                state_dict[prefix + new] = torch.stack([t.t() if t.dim() == 2 else t for t in per_expert])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MoEOutput(NamedTuple):
    aux_loss: torch.Tensor       # balance_coef * balance_loss + z_coef * z_loss (add this to the training loss)
    balance_loss: torch.Tensor   # unweighted, for logging
    z_loss: torch.Tensor         # unweighted, for logging
    expert_counts: torch.Tensor  # (E,) assignments each expert computed (after capacity dropping)
    dropped: torch.Tensor        # assignments dropped by the capacity limit (expert choice: tokens no expert took)


class Routing(NamedTuple):
    """The assignments of one MoE call, grouped by expert (MoE.assign)."""
    logits: torch.Tensor   # (N, E) router logits, fp32
    probs: torch.Tensor    # (N, E) softmax of the logits
    tok: torch.Tensor      # (M,) the token of each assignment
    expert: torch.Tensor   # (M,) its expert (non-decreasing)
    weight: torch.Tensor   # (M,) its combine weight
    counts: torch.Tensor   # (E,) assignments each expert computes
    wanted: torch.Tensor   # (E,) assignments each expert was chosen for (before a capacity cut)
    dropped: torch.Tensor  # token choice: assignments cut by the capacity; expert choice: tokens no expert took

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """values (M,), one per assignment -> (N, E): each token's value for each expert, 0 where none."""
        return torch.zeros_like(self.probs).index_put_((self.tok, self.expert), values.to(self.probs.dtype))


class MoE(nn.Module):
    """Sparse mixture-of-experts feed-forward layer (top-k routing, dropless by default).

    Routing, per token x (C,):
        logits = gate(x)                                   (E,) (+ softplus(noise(x) + b) * N(0, 1) in training,
                                                           if noisy; b = softplus^-1(noise_init): the std starts there)
        probs  = softmax(logits)  in float32               (E,)
        routing_weights, selected_experts = topk(probs, K) (K,), renormalised to sum 1 when norm_topk_prob
        y = sum_k routing_weights[k] * experts[selected_experts[k]](x)  (+ shared(x) when shared_experts > 0)
    With K=1 the weight is the raw probability, so the router still receives gradient through y.

    Dispatch: the N*K (token, expert) assignments are sorted by expert, each expert runs once on its
    contiguous slice, and results are scattered back with index_add. No loop over tokens, and no expert sees a
    token it was not chosen for. With capacity_factor > 0 each expert keeps its ceil(cf * N * K / E) assignments
    with the highest router weight; the dropped ones contribute nothing (the residual carries the token).

    Auxiliary losses (returned as values, never stored on the module):
        balance = E * sum_i f_i * P_i   f_i: share of assignments to expert i (no gradient),
                                        P_i: mean router probability of expert i (carries gradient) — Switch §2.2
        z       = mean(logsumexp(logits)^2)                                                          — ST-MoE §3

    balance="bias" (auxiliary-loss-free, Wang et al. 2024; DeepSeek-V3): the experts are *selected* by
    topk(probs + expert_bias) while the weights stay the probabilities of the selected experts, so the bias
    steers which experts a token visits, never how much each counts. After every optimizer step the trainer
    calls update_bias(): expert_bias += bias_rate * sign(mean load - load) over the step's assignments (summed
    over micro-batches and, under torchrun, ranks). No gradient flows into it; the balance loss is then logged
    but not added. The bias is a buffer: saved in checkpoints and resumed.

    routing="expert" (expert choice, Zhou et al. 2022), outside causal stacks: each expert e takes the
    c = ceil(cf * N * K / E) tokens (cf = capacity_factor, or 1) with the highest probs[:, e] and weights each by
    that probability; a token may get 0..E experts. Every expert computes exactly c rows, so there is no balance
    loss (z-loss only), and `dropped` counts the tokens no expert took. The choice is over the whole batch: a
    text's output depends on the texts batched with it.
    """

    def __init__(self, config: ModelConfig, causal: bool = False):
        super().__init__()
        C, E = config.d_model, config.num_experts
        self.num_experts, self.top_k = E, config.top_k
        # expert choice reads the whole batch to pick tokens: never in a causal stack (decoder, LM)
        self.expert_choice = config.routing == "expert" and not causal
        self.norm_topk_prob = config.norm_topk_prob and config.top_k > 1
        self.capacity_factor = config.capacity_factor
        self.balance_coef, self.z_coef = config.balance_coef, config.z_coef
        self.gate = nn.Linear(C, E, bias=False)
        self.noise = nn.Linear(C, E, bias=False) if config.noisy_gate else None
        self.noise_offset = math.log(math.expm1(config.noise_init)) if config.noisy_gate else 0.0
        self.experts = Experts(E, C, config.d_ff, config.moe_impl)
        # S shared experts = one FFN of width S * d_ff, unweighted: it learns from every token, the routed
        # experts only from theirs
        S = config.shared_experts
        self.shared = FeedForward(C, config.d_ff * S) if S else None
        self.bias_rate = config.bias_rate
        # (E,) balance="bias": added to the scores that select experts, never to their weights; saved and resumed.
        # None (no state_dict entry) under balance="loss"
        self.register_buffer("expert_bias", torch.zeros(E) if config.balance == "bias" else None)
        # (E,) assignments since the last update_bias; a plain attribute, not a buffer, so that DDP does not
        # overwrite each rank's own count with rank 0's
        self.pending_load = None

    @torch.no_grad()
    def update_bias(self) -> None:
        """balance="bias": move each expert's selection bias one step toward the mean load (called by the trainer
        after each optimizer step, with the assignments counted since the last call)."""
        if self.pending_load is None:
            return
        load = self.pending_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank applies the same update: the biases stay equal
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
        self.pending_load = None

    def route(self, x):
        """x (N, C) -> router_logits (N, E) fp32 (noised in training, if noisy), probs (N, E)."""
        router_logits = self.gate(x).float()
        if self.noise is not None and self.training:
            noise_std = F.softplus(self.noise(x).float() + self.noise_offset)  # (N, E), learned per token
            router_logits = router_logits + torch.randn_like(router_logits) * noise_std
        return router_logits, router_logits.softmax(dim=-1)  # float32 for a stable softmax under bf16

    def select(self, probs):
        """Token choice: probs (N, E) -> routing_weights (N, K), selected_experts (N, K)."""
        if self.expert_bias is not None:  # the bias picks the experts; the weights stay the probabilities
            selected_experts = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, K)
            routing_weights = probs.gather(1, selected_experts)
        else:
            routing_weights, selected_experts = probs.topk(self.top_k, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        return routing_weights, selected_experts

    def assign(self, flat) -> Routing:
        """flat (N, C) real tokens -> Routing: which token goes to which expert with what weight, grouped by
        expert (M assignments; M = N * K under token choice without drops)."""
        N, E, K = flat.size(0), self.num_experts, self.top_k
        router_logits, probs = self.route(flat)
        if self.expert_choice:
            # each expert takes the tokens it scores highest: the same number for every expert
            capacity = min(N, math.ceil((self.capacity_factor or 1.0) * N * K / E))
            weight, tok = probs.t().topk(capacity, dim=1)  # (E, capacity) probability and token, per expert
            counts = torch.full((E,), capacity, dtype=torch.long, device=flat.device)
            expert = torch.arange(E, device=flat.device).repeat_interleave(capacity)  # (M,)
            picked = torch.zeros(N, dtype=torch.bool, device=flat.device).index_fill_(0, tok.reshape(-1), True)
            return Routing(router_logits, probs, tok.reshape(-1), expert, weight.reshape(-1), counts, counts,
                           N - picked.sum())  # dropped: tokens no expert took (the residual carries them)
        # ---- token choice: sort the N*K assignments by expert
        routing_weights, selected_experts = self.select(probs)
        expert_of = selected_experts.reshape(-1)  # (N*K,)
        weight_of = routing_weights.reshape(-1)  # (N*K,)
        # (E,) assignments wanted per expert; not bincount, whose output size depends on the data (a host sync on
        # CUDA, a graph break under torch.compile, an unknown length for torch.export)
        wanted = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, expert_of,
                                                                                  torch.ones_like(expert_of))
        counts, dropped = wanted, torch.zeros((), device=flat.device, dtype=torch.long)
        if self.capacity_factor > 0:
            # highest router weight first inside each expert, so the capacity cut drops the least wanted
            by_weight = weight_of.detach().argsort(descending=True, stable=True)
            order = by_weight[expert_of[by_weight].argsort(stable=True)]
            capacity = math.ceil(self.capacity_factor * N * K / E)
            starts = wanted.cumsum(0) - wanted
            rank_in_expert = torch.arange(N * K, device=flat.device) - starts[expert_of[order]]
            order = order[rank_in_expert < capacity]
            counts = wanted.clamp(max=capacity)
            dropped = wanted.sum() - counts.sum()
        else:
            order = expert_of.argsort()  # order inside an expert does not matter (and ONNX has no stable sort)
        # order // K: the token of each kept assignment (row-major (N, K)), grouped by expert
        return Routing(router_logits, probs, order // K, expert_of[order], weight_of.index_select(0, order),
                       counts, wanted, dropped)

    def forward(self, x, mask=None):
        """x (B, T, C), mask (B, T) True on real tokens -> y (B, T, C), MoEOutput. Padding is not routed."""
        B, T, C = x.shape
        E, K = self.num_experts, self.top_k
        flat = x.reshape(-1, C)  # (B*T, C)
        rows = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None
        if rows is not None:
            flat = flat.index_select(0, rows)  # (N, C)
        N = flat.size(0)
        r = self.assign(flat)
        xs = flat.index_select(0, r.tok)  # (M, C) one gather for all experts (its backward is one index_add)
        capacity = r.tok.size(0) // E if self.expert_choice else None  # every expert took as many tokens
        ys = self.experts(xs, r.counts, r.expert, capacity)  # (M, C) all experts at once, no loop over tokens
        ys = ys * r.weight.to(ys.dtype)[:, None]  # (M, C) weighted by the router
        out = torch.zeros_like(flat).index_add(0, r.tok, ys.to(flat.dtype))  # (N, C) sum of each token's experts
        if self.shared is not None:
            out = out + self.shared(flat).to(out.dtype)
        if rows is not None:
            out = torch.zeros_like(x.reshape(-1, C)).index_copy(0, rows, out)
        out = out.view(B, T, C)

        if _exporting:  # an exported graph (ONNX) computes the output only
            return out, None
        # ---- auxiliary losses
        f = r.wanted.float() / max(N * K, 1)  # (E,) share of assignments (before any capacity drop)
        P = r.probs.mean(dim=0) if N else r.probs.sum(dim=0)  # (E,) mean router probability, differentiable
        balance = E * (f * P).sum()
        z = torch.logsumexp(r.logits, dim=-1).pow(2).mean() if N else r.logits.sum()
        if self.expert_choice:
            aux = self.z_coef * z  # every expert takes the same number of tokens: nothing to balance
        elif self.expert_bias is not None:
            aux = self.z_coef * z  # balanced by the bias, not by a loss
            if self.training and torch.is_grad_enabled():
                load = r.wanted.detach().float()
                self.pending_load = load if self.pending_load is None else self.pending_load + load
        else:
            aux = self.balance_coef * balance + self.z_coef * z
        return out, MoEOutput(aux, balance.detach(), z.detach(), r.counts.detach(), r.dropped)


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
            y, stats = self.ffn(h, route_mask)
        else:
            y, stats = self.ffn(h), None
        return x + self.drop(y), stats


def sum_aux(stats: list[MoEOutput | None], device) -> tuple[torch.Tensor, dict]:
    """Total weighted aux loss of all MoE layers, and the unweighted parts + per-layer counts for logging.
    The logged values stay 0-d tensors on the device (reading them is a host sync: the trainer does it only
    when it logs)."""
    stats = [s for s in stats if s is not None]
    zero = torch.zeros((), device=device)
    if not stats:
        return zero, {"balance": zero, "z": zero, "counts": [], "dropped": zero}
    aux = sum(s.aux_loss for s in stats)
    return aux, {
        "balance": sum(s.balance_loss for s in stats) / len(stats),
        "z": sum(s.z_loss for s in stats) / len(stats),
        "counts": [s.expert_counts for s in stats],
        "dropped": sum(s.dropped for s in stats),
    }


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


def count_params(model: nn.Module, config: ModelConfig) -> tuple[int, int]:
    """(total, active): active counts only top_k of the routed experts of each MoE layer (plus the router and
    the shared experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
            inactive += per_expert * (m.num_experts - m.top_k)
    return total, total - inactive


# -----------------------------------------------------------------------------
# Sparse upcycling: an MoE that starts from a trained dense model

def upcycled_config(moe_cfg: ModelConfig, dense_cfg: ModelConfig) -> ModelConfig:
    """The config of an MoE upcycled from a dense model (Komatsuzaki et al. 2022): the dense model's shape and
    task fields, the MoE fields of `moe_cfg`, and experts as wide as the dense FFN (each starts as a copy of it,
    so d_ff = the dense hidden width; the layers that stay dense keep it too, as dense_ff)."""
    if dense_cfg.num_experts:
        raise ValueError(f"it is an MoE already (num_experts={dense_cfg.num_experts}); upcycling starts from a "
                         "dense model (trained with --num_experts 0)")
    if not moe_cfg.num_experts:
        raise ValueError("the model to train is dense (num_experts=0); upcycling builds an MoE")
    if moe_cfg.shared_experts:
        raise ValueError(f"shared_experts={moe_cfg.shared_experts}: the dense FFN becomes the routed experts; "
                         "upcycle with shared_experts=0")
    moe = {f.name: getattr(moe_cfg, f.name) for f in fields(MoEConfig)}
    hidden = dense_cfg.dense_hidden()
    return replace(dense_cfg, **moe, d_ff=hidden, dense_ff=hidden)


@torch.no_grad()
def upcycle(model: nn.Module, dense_state: dict, noise: float = 0.0, seed: int = 0) -> None:
    """Load a dense model's weights into `model` (built from upcycled_config): every parameter it shares with the
    dense model is copied, each expert of an MoE layer becomes a copy of the dense FFN at that place, with
    `noise` * std(weight) * N(0, 1) added to its weight matrices so the experts can drift apart; routers stay
    freshly initialised. Without noise, and with top_k >= 2 and norm_topk_prob (the K weights sum to 1), the
    MoE computes the dense model's function at step 0: sum_k w_k * ffn(x) = ffn(x)."""
    generator = torch.Generator().manual_seed(seed)
    moe_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, MoE)]
    # stacked expert tensor -> (dense FFN tensor, transposed?): nn.Linear stores (out, in), Experts (E, in, out)
    sources = {"w_up": ("up.weight", True), "b_up": ("up.bias", False),
               "w_down": ("down.weight", True), "b_down": ("down.bias", False)}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in moe_prefixes if key.startswith(p)), None)
        role = key[len(prefix) + len("experts."):] if prefix and key.startswith(prefix + "experts.") else None
        if role in sources:
            name, transpose = sources[role]
            src = dense_state.get(prefix + name)
            if src is None:
                raise ValueError(f"no dense FFN weight {prefix + name} for the experts of {prefix[:-1]}")
            src = src.t() if transpose else src
            if src.shape != value.shape[1:]:
                raise ValueError(f"{prefix + name} has shape {tuple(src.shape)}, the experts need "
                                 f"{tuple(value.shape[1:])}")
            copies = src.to(value.dtype).expand_as(value).clone()  # (E, ...) one copy per expert
            if noise and copies.dim() == 3:
                copies += noise * src.float().std() * torch.randn(copies.shape, generator=generator)
            state[key] = copies
        elif prefix:  # the router (gate, noise) and the balance bias start fresh
            state[key] = value
        elif key not in dense_state or dense_state[key].shape != value.shape:
            have = tuple(dense_state[key].shape) if key in dense_state else "nothing"
            raise ValueError(f"{key}: the dense checkpoint has {have}, the MoE needs {tuple(value.shape)}")
        else:
            state[key] = dense_state[key]
    model.load_state_dict(state)


# -----------------------------------------------------------------------------
# Classifier (MiniBERT-MoE)

class Classifier(nn.Module):
    """Token + position + segment embeddings, N pre-norm blocks, [CLS] or mean pooling, a linear head.

    With num_layers=0 it is the small model: mean of the token embeddings -> one MoE (or dense) layer -> head.
    """
    grad_checkpoint = False  # set by the trainer (TrainConfig.grad_checkpoint)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.max_len, C) if config.num_layers else None
        self.seg_emb = nn.Embedding(config.type_vocab_size, C) if config.num_layers else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i)) for i in range(config.num_layers))
        if config.num_layers == 0:
            # the pooled model: one feed-forward layer over the pooled embedding, residual like a block
            self.pooled_ffn = Block(config, config.num_experts > 0).ffn
        self.norm = RMSNorm(C)
        self.head = nn.Linear(C, config.num_classes)
        self.ngram = nn.Embedding(config.ngram_buckets, config.num_classes) if config.ngram_buckets else None
        init_weights(self, config.num_layers)
        if self.ngram is not None:
            nn.init.zeros_(self.ngram.weight)  # at step 0 the model is the deep part alone

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        """input_ids, attention_mask (B, T) -> hidden states (B, T, C) after the final norm, MoE stats."""
        B, T = input_ids.shape
        mask = attention_mask.bool()
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(T, device=input_ids.device))[None]  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.seg_emb(token_type_ids)
        x, stats = run_blocks(self.blocks, self.drop(x), self.grad_checkpoint, mask=mask)
        return self.norm(x), stats

    def forward(self, input_ids, attention_mask, labels=None, token_type_ids=None, label_smoothing=0.0):
        """input_ids, attention_mask (B, T) -> logits (B, classes), loss (CE + aux) or None, info dict."""
        mask = attention_mask.bool()
        if self.config.num_layers:
            x, stats = self.encode(input_ids, attention_mask, token_type_ids)
            pooled = x[:, 0] if self.config.pooling == "cls" else masked_mean(x, mask)
        else:
            stats = []
            pooled = self.drop(masked_mean(self.tok_emb(input_ids), mask))  # (B, C)
            h = pooled[:, None]  # (B, 1, C): one "token" per text for the MoE
            if isinstance(self.pooled_ffn, MoE):
                y, s = self.pooled_ffn(h)
                stats.append(s)
            else:
                y = self.pooled_ffn(h)
            pooled = self.norm(pooled + y[:, 0])
        logits = self.head(self.drop(pooled)).float()  # (B, classes)
        if self.ngram is not None:
            logits = logits + self.wide(input_ids, mask)
        return logits, *task_loss(logits, labels, stats, label_smoothing)

    def wide(self, input_ids, mask):
        """The linear part: each token 1-, 2- and 3-gram hashed to one of ngram_buckets rows of class weights,
        summed over the text / sqrt(count) -> logits (B, classes). Token n-grams of the byte-level BPE span about
        1-5 characters, the features a TF-IDF + linear SVM baseline uses; here they train with the encoder."""
        ids = input_ids.long()
        grams, valid = [ids], [mask]
        for n in (2, 3):  # polynomial rolling hash of the n tokens (fits int64 for ids < 2^16)
            grams.append(grams[-1][:, :-1] * 1_000_003 + ids[:, n - 1:])
            valid.append(valid[-1][:, :-1] & mask[:, n - 1:])
        rows = torch.cat([(g * 31 + n) % self.config.ngram_buckets for n, g in enumerate(grams, 1)], 1)  # (B, N)
        keep = torch.cat(valid, 1).to(self.ngram.weight.dtype)  # (B, N)
        summed = (self.ngram(rows) * keep[..., None]).sum(1)  # (B, classes)
        return (summed / keep.sum(1, keepdim=True).clamp(min=1).sqrt()).float()

    def mlm(self, input_ids, attention_mask, labels, label_smoothing=0.0):
        """Masked-LM pretraining of the encoder (BERT): predict the original token where labels != -100.

        The output layer is the token embedding (tied), so pretraining adds no parameters to the classifier.
        """
        if not self.config.num_layers:
            raise ValueError("masked-LM pretraining needs num_layers > 0")
        x, stats = self.encode(input_ids, attention_mask)
        picked = labels != -100
        logits = (x[picked] @ self.tok_emb.weight.t()).float()  # (masked tokens, vocab)
        return logits, *task_loss(logits, labels[picked], stats, label_smoothing)


class MaskedLM(nn.Module):
    """View of a Classifier whose forward is the masked-LM objective, so the one training loop can run it."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, labels, label_smoothing=0.0):
        return self.classifier.mlm(input_ids, attention_mask, labels, label_smoothing)

    @property
    def grad_checkpoint(self) -> bool:  # the trainer sets it on the model it runs: pass it to the encoder
        return self.classifier.grad_checkpoint

    @grad_checkpoint.setter
    def grad_checkpoint(self, on: bool):
        self.classifier.grad_checkpoint = on


def masked_mean(x, mask):
    """x (B, T, C), mask (B, T) -> (B, C) mean over real tokens."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


# -----------------------------------------------------------------------------
# Language model (decoder-only, noisy top-k MoE)

class LanguageModel(nn.Module):
    """GPT-style decoder: token + position embeddings, causal pre-norm blocks, tied output embedding."""
    grad_checkpoint = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.max_len, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i), causal=True)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(C)
        init_weights(self, config.num_layers)

    def forward(self, idx, targets=None, caches=None, label_smoothing=0.0):
        """idx (B, T) -> logits (B, T, V), loss (CE + aux) or None, info.

        `caches`: one dict per block (see Attention); with caches, idx continues the cached sequence.
        """
        B, T = idx.shape
        past = caches[0].get("self", {}).get("k").size(2) if caches and caches[0].get("self") else 0
        if past + T > self.config.max_len:
            raise ValueError(f"sequence of {past + T} tokens is longer than max_len={self.config.max_len}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos)[None])  # (B, T, C)
        x, stats = run_blocks(self.blocks, x, self.grad_checkpoint, caches, causal=True)
        logits = (self.norm(x) @ self.tok_emb.weight.t()).float()  # (B, T, V), tied embedding
        return logits, *task_loss(logits, targets, stats, label_smoothing)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, generator=None, use_cache: bool = True):
        """Yield new token ids one at a time (B=1). With the KV cache each step feeds only the newest token.

        When the context window fills up, the last half of it is re-encoded and decoding goes on from there.
        """
        self.eval()
        window = self.config.max_len
        seq = idx[:, -window:]
        caches = [{} for _ in self.blocks] if use_cache else None
        logits, _, _ = self(seq, caches=caches)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            yield int(nxt[0, 0])
            if eos_id is not None and int(nxt[0, 0]) == eos_id:
                return
            seq = torch.cat([seq, nxt], dim=1)
            if seq.size(1) > window:  # re-encode the recent half: absolute positions must restart
                seq = seq[:, -(window // 2):]
                caches = [{} for _ in self.blocks] if use_cache else None
                logits, _, _ = self(seq, caches=caches)
            elif use_cache:
                logits, _, _ = self(nxt, caches=caches)
            else:
                logits, _, _ = self(seq)


# -----------------------------------------------------------------------------
# Seq2seq (encoder-decoder, MoE in both stacks)

class Seq2Seq(nn.Module):
    """Encoder (bidirectional, padding mask) + decoder (causal self-attention with KV cache, cross-attention to
    the encoder). One tokenizer for both sides, so one token embedding: it is shared by the encoder, the decoder
    and the output layer (tied). Which layers of each stack are MoE follows `moe_layers`, by index in the stack.
    """
    grad_checkpoint = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C, n_dec = config.d_model, config.decoder_layers or config.num_layers
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.enc_pos = None if config.rope else nn.Embedding(config.max_len, C)
        self.dec_pos = None if config.rope else nn.Embedding(config.max_len, C)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, config.is_moe_layer(i)) for i in range(config.num_layers))
        self.decoder = nn.ModuleList(Block(config, config.is_moe_layer(i), cross=True, causal=True)
                                     for i in range(n_dec))
        self.enc_norm = RMSNorm(C)
        self.dec_norm = RMSNorm(C)
        init_weights(self, config.num_layers + n_dec)

    def encode(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, S) -> memory (B, S, C), MoE stats."""
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.tok_emb(input_ids) + (self.enc_pos(pos)[None] if self.enc_pos is not None else 0)
        x, stats = run_blocks(self.encoder, self.drop(x), self.grad_checkpoint, mask=attention_mask.bool(), pos=pos)
        return self.enc_norm(x), stats

    def decode(self, decoder_input_ids, memory, attention_mask, decoder_attention_mask=None, caches=None):
        """decoder_input_ids (B, T) continuing the cached prefix -> logits (B, T, V), MoE stats."""
        T = decoder_input_ids.size(1)
        past = caches[0]["self"]["k"].size(2) if caches and caches[0].get("self") else 0
        if past + T > self.config.max_len:
            raise ValueError(f"target of {past + T} tokens is longer than max_len={self.config.max_len}")
        pos = torch.arange(past, past + T, device=decoder_input_ids.device)
        x = self.tok_emb(decoder_input_ids) + (self.dec_pos(pos)[None] if self.dec_pos is not None else 0)
        mask = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        x, stats = run_blocks(self.decoder, self.drop(x), self.grad_checkpoint, caches, mask=mask, causal=True,
                              context=memory, context_mask=attention_mask.bool(), pos=pos)
        return (self.dec_norm(x) @ self.tok_emb.weight.t()).float(), stats  # tied output layer

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None, labels=None,
                label_smoothing=0.0):
        """Teacher forcing. labels (B, T): the next target token, -100 on padding -> logits, loss, info."""
        memory, enc_stats = self.encode(input_ids, attention_mask)
        logits, dec_stats = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
        return logits, *task_loss(logits, labels, enc_stats + dec_stats, label_smoothing)

    def _start(self, input_ids, attention_mask, bos_id: int, use_cache: bool):
        memory, _ = self.encode(input_ids, attention_mask)
        tokens = torch.full((input_ids.size(0), 1), bos_id, dtype=torch.long, device=input_ids.device)
        return memory, tokens, [{} for _ in self.decoder] if use_cache else None

    def _next_logprobs(self, tokens, memory, attention_mask, caches):
        """Log-probabilities of the next token (B, V): with caches only the newest token is fed."""
        logits, _ = self.decode(tokens[:, -1:] if caches is not None else tokens, memory, attention_mask,
                                caches=caches)
        return logits[:, -1].log_softmax(-1)

    @torch.no_grad()
    def greedy(self, input_ids, attention_mask, bos_id: int, eos_id: int, max_new_tokens: int,
               use_cache: bool = True) -> list[list[int]]:
        """Batched greedy decoding -> one list of target ids per source (without bos/eos).

        The encoder runs once; the cross-attention keys/values are computed on the first step and cached."""
        self.eval()
        max_new_tokens = min(max_new_tokens, self.config.max_len - 1)
        memory, tokens, caches = self._start(input_ids, attention_mask, bos_id, use_cache)
        done = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = self._next_logprobs(tokens, memory, attention_mask, caches).argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, eos_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
        return [strip_eos(row, eos_id) for row in tokens[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(self, input_ids, attention_mask, bos_id: int, eos_id: int, max_new_tokens: int,
                    beam_size: int = 4, length_penalty: float = 1.0) -> list[list[int]]:
        """Batched beam search with the KV cache -> the best hypothesis per source (without bos/eos)."""
        return [hyps[0][1] for hyps in self.beam_hypotheses(input_ids, attention_mask, bos_id, eos_id,
                                                            max_new_tokens, beam_size, length_penalty)]

    @torch.no_grad()
    def beam_hypotheses(self, input_ids, attention_mask, bos_id: int, eos_id: int, max_new_tokens: int,
                        beam_size: int = 4, length_penalty: float = 1.0,
                        fusion=None) -> list[list[tuple[float, list[int]]]]:
        """Batched beam search with the KV cache -> per source, its finished hypotheses as (score, ids without
        bos/eos), best first: the candidates an input method shows.

        A hypothesis' score is its summed log-probability / length ** length_penalty. Each source keeps
        `beam_size` live beams; a source is done once it has `beam_size` finished hypotheses (early stopping).
        `fusion`: a callable from the live beams' target ids (lists without bos) to a (rows, V) tensor added to the
        model's log-probabilities at every step: shallow fusion's weight * log P_LM, the pinyin constraint's
        0 / -inf (task_s2s.fusion_term).
        """
        self.eval()
        B, W = input_ids.size(0), beam_size
        max_new_tokens = min(max_new_tokens, self.config.max_len - 1)
        memory, tokens, caches = self._start(input_ids.repeat_interleave(W, 0),
                                             attention_mask.repeat_interleave(W, 0), bos_id, True)
        mask = attention_mask.repeat_interleave(W, 0)  # (B*W, S): beams of one source are adjacent
        scores = torch.zeros(B, W, device=tokens.device)
        scores[:, 1:] = float("-inf")  # all beams start as the same "<bos>": expand only the first
        finished = [[] for _ in range(B)]  # (normalised score, ids) per source
        done = [False] * B
        for _ in range(max_new_tokens):
            logp = self._next_logprobs(tokens, memory, mask, caches)  # (B*W, V)
            if fusion is not None:
                logp = logp + fusion(tokens[:, 1:].tolist()).to(logp)
            V = logp.size(-1)
            cand = (scores.view(-1, 1) + logp).view(B, W * V)
            top_scores, top_idx = cand.topk(2 * W, dim=-1)  # 2W: enough to refill W beams after eos picks
            new_scores = torch.full((B, W), float("-inf"), device=tokens.device)
            new_from = torch.arange(W, device=tokens.device).repeat(B, 1)  # (B, W) beam each new one extends
            new_tok = torch.full((B, W), eos_id, dtype=torch.long, device=tokens.device)
            for b in range(B):
                if done[b]:
                    continue
                k = 0
                for s, i in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                    if s == float("-inf"):
                        break
                    beam, tok = divmod(i, V)
                    if tok == eos_id:
                        seq = tokens[b * W + beam, 1:].tolist()
                        finished[b].append((s / (len(seq) + 1) ** length_penalty, seq))
                    else:
                        new_scores[b, k], new_from[b, k], new_tok[b, k] = s, beam, tok
                        k += 1
                        if k == W:
                            break
                done[b] = len(finished[b]) >= W
            if all(done):
                break
            rows = (torch.arange(B, device=tokens.device)[:, None] * W + new_from).view(-1)  # (B*W,)
            tokens = torch.cat([tokens[rows], new_tok.view(-1, 1)], dim=1)
            for cache in caches:  # reorder the self-attention cache; cross K/V are the same for a source's beams
                cache["self"]["k"], cache["self"]["v"] = cache["self"]["k"][rows], cache["self"]["v"][rows]
            scores = new_scores
        out = []
        for b in range(B):
            if not finished[b]:  # ran out of length: rank the live beams the same way
                L = tokens.size(1) - 1
                finished[b] = [(float(scores[b, w]) / L ** length_penalty, tokens[b * W + w, 1:].tolist())
                               for w in range(W) if scores[b, w] > float("-inf")]
            out.append(sorted(finished[b], key=lambda f: -f[0]))
        return out


def strip_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """logits (B, V) -> logits with -inf outside the top_k and outside the smallest top_p nucleus."""
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep tokens until the mass before them reaches p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (B, V) -> next ids (B, 1); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def build_model(task: str, config: ModelConfig) -> nn.Module:
    if not isinstance(config, MODEL_CONFIGS.get(task, ModelConfig)):
        raise TypeError(f"a {task} model needs a {MODEL_CONFIGS[task].__name__}, not a {type(config).__name__}")
    if task == "cls":
        return Classifier(config)
    if task == "lm":
        return LanguageModel(config)
    if task == "seq2seq":
        return Seq2Seq(config)
    raise ValueError(f"unknown task {task!r}")
