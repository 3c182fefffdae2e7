"""Several processes on CPU (gloo): torchrun data parallel and expert parallel against one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint
from test_cli import ROOT, run_main

COMMON = ["--train", "--task", "lm", "--preset", "tiny", "--max_steps", "6", "--quiet",
          "--set", "log_every=1", "--set", "dropout=0", "--set", "noisy_gate=false"]


def torchrun(*args: str, script: str = "main.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def train_losses(run_dir) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "train_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 8: the run two processes with batch 4 each must reproduce."""
    d = tmp_path_factory.mktemp("single")
    run_main(*COMMON, "--batch_size", "8", "--checkpoint", str(d / "lm.pt"), "--out_dir", str(d))
    return d


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_double_batch(tmp_path, single):
    """2 ranks x batch 4 vs 1 process x batch 8: the same global batches, so the logged losses agree (the MoE
    balance loss is computed per rank, the only difference)."""
    multi = tmp_path / "multi"
    proc = torchrun(*COMMON, "--batch_size", "4", "--checkpoint", str(multi / "lm.pt"), "--out_dir", str(multi))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    losses = train_losses(multi)
    assert len(losses) == 6
    assert losses[0] == pytest.approx(train_losses(single)[0], abs=1e-5)  # same weights, same data
    assert losses == pytest.approx(train_losses(single), abs=2e-3)
    assert losses[-1] < losses[0]
    ckpt = load_checkpoint(multi / "lm.pt", "")
    assert ckpt["train_config"]["batch_size"] == 8  # the global batch is what the checkpoint records
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))  # one set of outputs, no per-rank copies


@pytest.mark.slow
def test_expert_parallel_layer_equals_one_process(tmp_path):
    """Outputs, losses, gradients, clipping norm, an AdamW step and the gathered optimizer state of 2 ranks with
    2 of 4 experts each equal one process with all 4 (LM dropless and with a capacity; seq2seq with an
    expert-choice encoder and a shared expert): see tests/expert_parallel_check.py."""
    out = tmp_path / "ok.txt"
    proc = torchrun(str(out), script="tests/expert_parallel_check.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open(out).read().count("ok ") == 3


@pytest.mark.slow
def test_expert_parallel_training_halts_resumes_and_matches_one_process(tmp_path, single):
    """main.py --set expert_parallel=true under torchrun: 3 steps (evaluated at 2: the experts are gathered and
    training goes on), halt, --resume to 6 (the resume state holds whole experts and their AdamW moments, each rank
    takes its slice back); the losses are one process's, and the checkpoint holds all experts, so one process
    loads it."""
    ep = tmp_path / "ep"
    flags = [*COMMON, "--batch_size", "4", "--set", "expert_parallel=true", "--set", "eval_every=2",
             "--checkpoint", str(ep / "lm.pt"), "--out_dir", str(ep)]
    first = torchrun(*flags, "--set", "halt_after=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["halted"]
    second = torchrun(*flags, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    losses = train_losses(ep)
    assert len(losses) == 6
    assert losses == pytest.approx(train_losses(single), abs=2e-3)
    ckpt = load_checkpoint(ep / "lm.pt", "")
    assert ckpt["state_dict"]["blocks.0.ffn.experts.w_up"].shape[0] == ckpt["model_config"]["num_experts"] == 4
    state = torch.load(ep / "lm.last.pt", weights_only=True)["resume"]["optimizer"]["state"]
    assert {tuple(s["exp_avg"].shape) for s in state.values()} >= {(4, 32, 32)}
    # one process loads the gathered weights, and they score a text as the one-process run's final weights do
    text = tmp_path / "text.txt"
    text.write_text("新华社北京一月一日电。\n今天天气很好，我们一起去公园散步。\n" * 4, encoding="utf-8")
    scores = [json.loads(run_main("--eval", "--task", "lm", "--checkpoint", str(d / "lm.last.pt"), "--input",
                                  str(text)).stdout.strip().splitlines()[-1])["loss"] for d in (ep, single)]
    assert scores[0] == pytest.approx(scores[1], abs=2e-3)


def test_expert_parallel_needs_torchrun():
    proc = run_main(*COMMON, "--set", "expert_parallel=true", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --set expert_parallel=true: run under torchrun")


def test_expert_parallel_needs_experts_for_every_process():
    from distributed import check_expert_parallel
    from errors import DataError
    with pytest.raises(DataError, match="num_experts=3 must be a positive multiple of the 2 processes"):
        check_expert_parallel(3, 2)
    with pytest.raises(DataError, match="num_experts=0"):
        check_expert_parallel(0, 2)
    check_expert_parallel(4, 2)
