"""Expert parallelism under torchrun (`--set expert_parallel=true`): each of the P processes holds E/P experts of
every MoE layer, and the routed tokens travel to their expert's process and back by all_to_all.

    rank r holds experts [r*E/P, (r+1)*E/P) of each layer (ShardedExperts; same parameter names as Experts)
    forward, per MoE layer, after the (replicated) router grouped this rank's assignments by expert:
        counts (E,) -> all_to_all -> how many rows each source rank sends to each of my experts (P, E/P)
        rows (M, C) -> all_to_all -> my experts' rows from every rank -> my experts -> all_to_all back (M, C)
    backward: the same two exchanges in reverse (AllToAll below)

Everything else (attention, embeddings, routers, heads) is data parallel as under plain torchrun: DDP averages
those gradients over the ranks. DDP is told to leave the expert weights alone (each rank's are different); their
gradient arrives already summed over every rank's tokens through the exchange, so it is scaled by 1/P to be the
same average DDP takes; gradient clipping then uses the norm over all ranks' experts. The result equals one process
holding every expert and training on the whole global batch (tests/test_parallel.py).

Evaluation, checkpoints and the resume state see whole experts: `whole_experts` gathers them (and their optimizer
moments) onto every rank for that moment, and a sharded model loads a whole checkpoint by taking its slice. So
what expert parallelism saves is the training memory of the experts: their weights, gradients and AdamW moments
are 1/P per process. What it costs: two all_to_all per MoE layer forward and two backward, of M x C activations
(M = tokens x top_k) each, plus one small exchange of counts.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from moe import Experts, MoE


class AllToAll(torch.autograd.Function):
    """Rows of x go to the ranks by `send` sizes; rows arrive by `recv` sizes. The gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int]):
        ctx.send, ctx.recv = send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllToAll.apply(grad, ctx.recv, ctx.send), None, None


class ShardedExperts(Experts):
    """This rank's E/P experts of one MoE layer; forward takes the rank's assignments for *all* E experts."""

    def __init__(self, whole: Experts, rank: int, world: int):
        E = whole.num_experts
        if E % world:
            raise ValueError(f"expert_parallel: num_experts={E} must be a multiple of the {world} processes")
        local = E // world
        with torch.random.fork_rng(devices=[]):  # overwritten below: leave the random stream as one process has it
            super().__init__(local, whole.w_up.size(1), whole.w_up.size(2), whole.impl)
        self.rank, self.world, self.total = rank, world, E
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(getattr(whole, name)[rank * local:(rank + 1) * local])
        self.to(whole.w_up.device)

    def forward(self, xs, counts, expert_ids, capacity=None):
        """xs (M, C) grouped by expert, counts (E,) over all experts -> (M, C): each row computed by its expert,
        wherever that expert lives. `capacity` (expert choice): each of my experts gets every rank's capacity,
        so they still all have the same number of rows."""
        P, local = self.world, self.num_experts
        send_counts = counts.view(P, local)  # row p: what rank p's experts get from me
        recv_counts = torch.empty_like(send_counts)  # row p: what my experts get from rank p
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        arrived = AllToAll.apply(xs, send, recv)  # (R, C) by source rank, then by my expert
        mine = torch.arange(local, device=xs.device).repeat(P).repeat_interleave(recv_counts.reshape(-1))  # (R,)
        order = mine.argsort(stable=True)  # group the arrivals by my expert
        ys = super().forward(arrived.index_select(0, order), recv_counts.sum(0), mine.index_select(0, order),
                             sum(recv) // local if capacity is not None else None)
        ys = ys.index_select(0, order.argsort())  # back to arrival order
        return AllToAll.apply(ys, recv, send)  # (M, C) home again, in xs's order

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A whole checkpoint (E experts) loads as this rank's slice."""
        local = self.num_experts
        for name in ("w_up", "b_up", "w_down", "b_down"):
            t = state_dict.get(prefix + name)
            if t is not None and t.size(0) == self.total != local:
                state_dict[prefix + name] = t[self.rank * local:(self.rank + 1) * local]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gathered(self) -> Experts:
        """All E experts, every rank's slice gathered (a collective: every rank calls it)."""
        with torch.random.fork_rng(devices=[]):  # overwritten below
            whole = Experts(self.total, self.w_up.size(1), self.w_up.size(2), self.impl).to(self.w_up.device)
        with torch.no_grad():
            for name, p in self.named_parameters():
                getattr(whole, name).copy_(all_gather_rows(p.detach()))
        whole.train(self.training)
        return whole


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t (same shape) concatenated along dim 0, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sharded_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, ShardedExperts)]


def shard(model: nn.Module, rank: int, world: int) -> list[str]:
    """Keep this rank's E/P experts of every MoE layer (in place); returns the names of their parameters, which
    DDP must leave alone. Their gradients are scaled by 1/P (see the module docstring)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, MoE) and not isinstance(m.experts, ShardedExperts):
            m.experts = ShardedExperts(m.experts, rank, world)
            for pname, p in m.experts.named_parameters():
                p.register_hook(lambda g: g / world)
                names.append(f"{name}.experts.{pname}")
    return names


def unshard(model: nn.Module) -> None:
    """Every MoE layer whole again on every rank (a collective), e.g. at the end of training."""
    for m in sharded_layers(model):
        m.experts = m.experts.gathered()


@contextlib.contextmanager
def whole_experts(model: nn.Module, optimizer: torch.optim.Optimizer):
    """For the length of the block, every rank's model holds all experts (for evaluation and checkpoints); yields
    the optimizer's state_dict with the expert moments gathered too (None when nothing is sharded). Every rank
    enters it together; afterwards the shards are back, untouched."""
    layers = sharded_layers(model)
    if not layers:
        yield None
        return
    state = map_expert_moments(optimizer.state_dict(), model, optimizer,
                               lambda experts, p, v: all_gather_rows(v) if v.shape == p.shape else v)
    shards = [m.experts for m in layers]
    for m in layers:
        m.experts = m.experts.gathered()
    try:
        yield state
    finally:
        for m, s in zip(layers, shards):
            m.experts = s


def local_optimizer_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state_dict (whole expert moments) -> this rank's (its experts' slice)."""
    def local_slice(experts: ShardedExperts, p, v):
        local, rank = experts.num_experts, experts.rank
        return v[rank * local:(rank + 1) * local] if v.dim() and v.size(0) == experts.total != local else v
    return map_expert_moments(state, model, optimizer, local_slice)


def map_expert_moments(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, fn) -> dict:
    """`state` (the optimizer's state_dict) with every tensor v of each sharded expert parameter p replaced by
    fn(experts, p, v). Each of those per-parameter dicts is replaced by a new one, never changed in place:
    state_dict() hands out the optimizer's own dicts."""
    index = optimizer_index(optimizer)
    for m in sharded_layers(model):
        for p in m.experts.parameters():
            i = index[id(p)]
            if i in state["state"]:
                state["state"][i] = {key: fn(m.experts, p, v) if torch.is_tensor(v) else v
                                     for key, v in state["state"][i].items()}
    return state


def optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> its index in optimizer.state_dict() (numbered in param_groups order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over a sharded model, the experts of every rank included: the same norm, and
    so the same clipping, on every rank (a collective)."""
    experts = {id(p) for m in sharded_layers(model) for p in m.experts.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    zero = torch.zeros((), device=params[0].device)
    square = lambda ps: sum((p.grad.detach().float().pow(2).sum() for p in ps), zero)
    own = square([p for p in params if id(p) in experts])
    dist.all_reduce(own)  # each rank's experts are its own: their squares add up over the ranks
    total = (square([p for p in params if id(p) not in experts]) + own).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
