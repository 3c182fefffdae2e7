"""Run by tests/test_parallel.py under `torchrun --nproc_per_node=2`: expert parallelism against one process.

Every rank builds the same models (same seed) and the same global batch. The reference holds all experts and
runs the whole batch (each rank's half as its own call, the loss their mean: what DDP's gradient average is);
the expert-parallel copy holds this rank's experts under DDP and runs this rank's half. Outputs, losses,
gradients (global norm included), one AdamW step and the gathered optimizer state must agree.
Writes "ok <task>" lines to the file named by argv[1] (rank 0); any mismatch fails the process.
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import expert_parallel
from config import model_config
from models import build_model

TINY = dict(d_model=32, n_heads=2, d_ff=48, num_layers=2, num_experts=4, top_k=2, vocab_size=97, max_len=16,
            dropout=0.0, noisy_gate=False)


def batch(task: str, g: torch.Generator) -> list[dict]:
    """The global batch (8 rows) as the two ranks' halves."""
    ids = torch.randint(1, 97, (8, 12), generator=g)
    if task == "lm":
        full = {"idx": ids, "targets": torch.randint(1, 97, (8, 12), generator=g)}
    else:
        mask = torch.arange(12)[None] < torch.randint(4, 13, (8, 1), generator=g)  # ragged: padding is not routed
        full = {"input_ids": ids * mask, "attention_mask": mask.long(),
                "decoder_input_ids": torch.randint(1, 97, (8, 10), generator=g),
                "labels": torch.randint(1, 97, (8, 10), generator=g)}
    return [{k: v[h * 4:(h + 1) * 4] for k, v in full.items()} for h in range(2)]


def check(task: str, extra: dict) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    ref = build_model(task, model_config(task, {**TINY, **extra}))
    ep = copy.deepcopy(ref)
    halves = batch(task, torch.Generator().manual_seed(1))

    outs = [ref(**h) for h in halves]
    ref_loss = (outs[0][1] + outs[1][1]) / 2
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)

    own = expert_parallel.shard(ep, rank, 2)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ep, own)
    net = DistributedDataParallel(ep, find_unused_parameters=True)
    logits, loss, _ = net(**halves[rank])
    loss.backward()
    norm = expert_parallel.clip_grad_norm_(ep, 0.5)

    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, outs[rank][0], **close)
    torch.testing.assert_close(loss, outs[rank][1], **close)
    torch.testing.assert_close(norm, ref_norm, **close)
    local = TINY["num_experts"] // 2
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        expected = ref_params[name].grad
        if name in own:  # this rank's slice of every expert tensor
            expected = expected[rank * local:(rank + 1) * local]
        torch.testing.assert_close(p.grad, expected, **close, msg=lambda m: f"{task} grad {name}: {m}")

    # one AdamW step each; then the whole model and the optimizer state gathered back equal the reference's
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-2)
    opt_ref.step()
    opt_ep.step()
    with expert_parallel.whole_experts(ep, opt_ep) as state:
        for (name, p), q in zip(ep.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(p, q, **close, msg=lambda m: f"{task} weight {name}: {m}")
        for i, s in opt_ref.state_dict()["state"].items():
            torch.testing.assert_close(state["state"][i]["exp_avg_sq"], s["exp_avg_sq"], **close)
    # the optimizer's own moments stayed this rank's slice, and a second step still equals the reference's
    assert all(s["exp_avg"].shape == p.shape for p, s in opt_ep.state.items())
    for model, opt, inputs in ((ref, opt_ref, halves), (net, opt_ep, [halves[rank]])):
        opt.zero_grad()
        sum(model(**h)[1] for h in inputs).div(len(inputs)).backward()
        opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        expected = ref_params[name] if name not in own else ref_params[name][rank * local:(rank + 1) * local]
        torch.testing.assert_close(p, expected, **close, msg=lambda m: f"{task} 2nd step {name}: {m}")
    # a whole state loads back as this rank's slice
    sliced = expert_parallel.local_optimizer_state(state, ep, opt_ep)
    for i, p in enumerate(ep.parameters()):
        assert sliced["state"][i]["exp_avg"].shape == p.shape
    dist.barrier()


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cases = [("lm", {}), ("lm", {"capacity_factor": 1.0}), ("seq2seq", {"routing": "expert", "shared_experts": 1})]
    for task, extra in cases:
        check(task, extra)
        if dist.get_rank() == 0:
            with open(sys.argv[1], "a") as f:
                f.write(f"ok {task} {extra}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
