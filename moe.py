"""The MoE layer: a router (noisy top-k token choice, or expert choice), the experts as stacked weights, the
auxiliary losses, and sparse upcycling of a dense FFN into experts.

Shapes: C model width, E experts, K experts per token (top_k), N tokens routed (B*T minus padding), M
assignments (N * K under token choice without drops).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from dataclasses import fields, replace

from config import ModelConfig, MoEConfig


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
    with E (on CPU grouped_mm still makes one BLAS mm per expert inside; what it saves is the dispatch around
    them). impl "loop": one addmm pair per expert on its slice (bias fused); the reference, and the path taken
    while exporting (ONNX has no grouped matmul) and on CUDA outside bf16 (grouped_mm's CUDA kernels want bf16).
    impl "auto" (default): "loop" on CPU once the average expert gets >= 1,024 rows, else "grouped": the faster
    one at each size in `bench.py --only moe` (docs/results.md). A padded (E, capacity, C) buffer + two bmm lost
    to both once it pads (uneven loads).
    Under expert choice every expert has exactly `capacity` rows, so xs is an (E, capacity, C) batch with no
    padding: two baddbmm (biases fused) for all experts, whatever impl says unless "loop"; faster than grouped at
    the seq2seq encoder's shape (docs/results.md).
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
        # analyze.Recorder: called with each forward's Routing, the positions it routed (None: all) and the
        # input's shape less the width, so the routing shown is the one computed, not a second pass of the router
        self.tap = None

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
        router_logits, probs = self.route(flat)
        if self.expert_choice:
            return self.experts_choose(router_logits, probs)
        return self.tokens_choose(router_logits, probs)

    def experts_choose(self, router_logits, probs) -> Routing:
        """Expert choice: each expert takes the tokens it scores highest, the same number for every expert."""
        N, E, K = probs.size(0), self.num_experts, self.top_k
        capacity = min(N, math.ceil((self.capacity_factor or 1.0) * N * K / E))
        weight, tok = probs.t().topk(capacity, dim=1)  # (E, capacity) probability and token, per expert
        counts = torch.full((E,), capacity, dtype=torch.long, device=probs.device)
        expert = torch.arange(E, device=probs.device).repeat_interleave(capacity)  # (M,)
        picked = torch.zeros(N, dtype=torch.bool, device=probs.device).index_fill_(0, tok.reshape(-1), True)
        return Routing(router_logits, probs, tok.reshape(-1), expert, weight.reshape(-1), counts, counts,
                       N - picked.sum())  # dropped: tokens no expert took (the residual carries them)

    def tokens_choose(self, router_logits, probs) -> Routing:
        """Token choice: each token's top-K experts, the N*K assignments sorted by expert (and cut to the
        capacity when capacity_factor > 0)."""
        E = self.num_experts
        routing_weights, selected_experts = self.select(probs)
        expert_of = selected_experts.reshape(-1)  # (N*K,)
        weight_of = routing_weights.reshape(-1)  # (N*K,)
        # (E,) assignments wanted per expert; not bincount, whose output size depends on the data (a host sync on
        # CUDA, a graph break under torch.compile, an unknown length for torch.export)
        wanted = torch.zeros(E, dtype=torch.long, device=probs.device).scatter_add_(0, expert_of,
                                                                                   torch.ones_like(expert_of))
        if self.capacity_factor > 0:
            order, counts = self.cut_to_capacity(expert_of, weight_of, wanted)
        else:  # the order inside an expert does not matter (and ONNX has no stable sort)
            order, counts = expert_of.argsort(), wanted
        # order // K: the token of each kept assignment (row-major (N, K)), grouped by expert
        return Routing(router_logits, probs, order // self.top_k, expert_of[order], weight_of.index_select(0, order),
                       counts, wanted, wanted.sum() - counts.sum())

    def cut_to_capacity(self, expert_of, weight_of, wanted) -> tuple[torch.Tensor, torch.Tensor]:
        """The assignments each expert keeps under capacity_factor (its ceil(cf * N * K / E) highest-weight ones)
        -> (their indices grouped by expert, (E,) kept per expert)."""
        M = expert_of.size(0)  # N * K
        # highest router weight first inside each expert, so the capacity cut drops the least wanted
        by_weight = weight_of.detach().argsort(descending=True, stable=True)
        order = by_weight[expert_of[by_weight].argsort(stable=True)]
        capacity = math.ceil(self.capacity_factor * M / self.num_experts)
        starts = wanted.cumsum(0) - wanted
        rank_in_expert = torch.arange(M, device=expert_of.device) - starts[expert_of[order]]
        return order[rank_in_expert < capacity], wanted.clamp(max=capacity)

    def forward(self, x, mask=None, decoding: bool = False):
        """x (B, T, C), mask (B, T) True on real tokens -> y (B, T, C), MoEOutput. Padding is not routed.
        `decoding` (a KV-cached step, in eval): a handful of tokens take few_tokens() and return no MoEOutput."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (B*T, C)
        rows = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None
        if rows is not None:
            flat = flat.index_select(0, rows)  # (N, C)
        few = decoding and not self.training and not _exporting and flat.size(0) * self.top_k <= self.num_experts
        if few:
            out, stats = self.few_tokens(flat), None
        else:
            r = self.assign(flat)
            if self.tap is not None:
                self.tap(r, rows, x.shape[:-1])
            out, stats = self.dispatch(flat, r), None if _exporting else self.aux_losses(r)
        if self.shared is not None:
            out = out + self.shared(flat).to(out.dtype)
        if rows is not None:
            out = torch.zeros_like(x.reshape(-1, C)).index_copy(0, rows, out)
        return out.view(B, T, C), stats  # an exported graph (ONNX) computes the output only

    def dispatch(self, flat, r: Routing):
        """flat (N, C) -> (N, C): every assignment computed by its expert, all experts at once, weighted and
        summed per token."""
        xs = flat.index_select(0, r.tok)  # (M, C) one gather for all experts (its backward is one index_add)
        capacity = r.tok.size(0) // self.num_experts if self.expert_choice else None  # every expert took as many
        ys = self.experts(xs, r.counts, r.expert, capacity)  # (M, C) all experts at once, no loop over tokens
        ys = ys * r.weight.to(ys.dtype)[:, None]  # (M, C) weighted by the router
        return torch.zeros_like(flat).index_add(0, r.tok, ys.to(flat.dtype))  # (N, C) sum of each token's experts

    def few_tokens(self, flat, gather: bool | None = None):
        """flat (N, C), N * K <= E (a decoding step: one new token per sequence) -> (N, C). Each token's K
        experts computed straight from their stacked weights: no sort, no grouping, no scatter, a third of
        dispatch's operations. Same function as dispatch (tests/test_moe.py). On CPU the weights are read as
        views, one addmm pair per assignment (reading the expert ids there costs nothing); elsewhere (or with
        `gather`) they are gathered into one batched matmul pair, so that the device never waits for the host."""
        N, C = flat.shape
        _, probs = self.route(flat)
        weights, experts = self.select(probs)  # (N, K)
        e, w = experts.reshape(-1), self.experts  # (N*K,)
        x = flat.repeat_interleave(self.top_k, dim=0)  # (N*K, C)
        if gather is None:
            gather = flat.device.type != "cpu"
        if not gather:
            y = torch.cat([torch.addmm(w.b_down[i], F.gelu(torch.addmm(w.b_up[i], x[j:j + 1], w.w_up[i])),
                                       w.w_down[i]) for j, i in enumerate(e.tolist())])  # (N*K, C)
        else:
            h = torch.baddbmm(w.b_up[e][:, None], x[:, None], w.w_up[e])  # (N*K, 1, H)
            y = torch.baddbmm(w.b_down[e][:, None], F.gelu(h), w.w_down[e])  # (N*K, 1, C)
        return (y.view(N, self.top_k, C) * weights[..., None].to(y.dtype)).sum(1).to(flat.dtype)

    def aux_losses(self, r: Routing) -> MoEOutput:
        """The balance and z losses of one call, weighted into the aux loss the model adds (under balance="bias"
        the loads are kept for update_bias instead)."""
        N, E, K = r.probs.size(0), self.num_experts, self.top_k
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
        return MoEOutput(aux, balance.detach(), z.detach(), r.counts.detach(), r.dropped)


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
