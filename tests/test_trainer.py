"""The trainer (trainer.Trainer): accumulation, logging, the schedule, out-of-memory skips, resume, autocast."""
import json

import pytest
import torch

import main
from checkpoint import last_path, load_checkpoint
from config import LMConfig, TrainConfig
from models import LanguageModel
from test_cli import run_main
from tracking import MetricsLog
from trainer import Checkpointer, fit


def lm_batches(n, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"idx": torch.randint(0, 64, (B, 16), generator=g), "targets": torch.randint(0, 64, (B, 16), generator=g)}
            for _ in range(n)]


def tiny_fit_model():
    torch.manual_seed(0)
    return LanguageModel(LMConfig(vocab_size=64, max_len=16, d_model=32, n_heads=2, num_layers=1, d_ff=16,
                                     num_experts=4, top_k=2, dropout=0.0, noisy_gate=False))


def fit_lm(batches, quiet=True, log=None, **cfg):
    model = tiny_fit_model()
    cfg = TrainConfig(**{"max_steps": 1, "warmup_ratio": 0.0, "lr": 1e-2, **cfg})
    result = fit(model, cfg, iter(batches), 1, evaluate=lambda: {"val_loss": 0.0}, select="-val_loss",
                 device=torch.device("cpu"), log=log or MetricsLog(None), quiet=quiet)
    return model, result


def test_logged_losses_are_the_mean_over_the_micro_batches():
    small = lm_batches(2, 4)
    log = MetricsLog(None)
    fit_lm(small, accum_steps=2, log_every=1, log=log)
    model = tiny_fit_model()  # the same weights the step started from
    with torch.no_grad():
        outputs = [model(**b) for b in small]  # (logits, loss, info) each
    losses, infos = [float(o[1]) for o in outputs], [o[2] for o in outputs]
    row = log.rows[0]
    assert abs(losses[0] - losses[1]) > 1e-3  # two different micro-batches, so "the last one" would differ
    assert row["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert row["ce"] == pytest.approx(sum(float(i["ce"]) for i in infos) / 2, rel=1e-5)
    assert row["aux_balance"] == pytest.approx(sum(float(i["balance"]) for i in infos) / 2, rel=1e-5)
    counts = sum(i["counts"][0] for i in infos).float()
    assert row["expert_load"][0] == pytest.approx((counts / counts.sum()).tolist())


def test_gradient_accumulation_equals_the_big_batch():
    small = lm_batches(2, 4)
    big = [{k: torch.cat([small[0][k], small[1][k]]) for k in small[0]}]
    a, _ = fit_lm(small, accum_steps=2)
    b, _ = fit_lm(big, accum_steps=1)
    c, _ = fit_lm(small[:1], accum_steps=1)  # one half only: what a broken accumulation would learn
    # AdamW's first step moves each weight by lr * sign(grad): only gradients within float noise of zero may
    # come out with the other sign, so nearly every weight must agree, and far fewer with the half batch
    def agree(m1, m2):
        same = sum(int(torch.isclose(p1, p2, atol=1e-6).sum()) for p1, p2 in zip(m1.parameters(), m2.parameters()))
        return same / sum(p.numel() for p in m1.parameters())
    assert agree(a, b) > 0.99 and agree(a, c) < 0.9


def test_out_of_memory_batch_is_skipped_and_counted():
    batches = lm_batches(4, 2)
    calls = {"n": 0}

    class Flaky(LanguageModel):
        def forward(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().forward(*a, **kw)

    torch.manual_seed(0)
    model = Flaky(LMConfig(vocab_size=64, max_len=16, d_model=32, n_heads=2, num_layers=1, d_ff=16,
                              num_experts=4, top_k=2, dropout=0.0))
    result = fit(model, TrainConfig(max_steps=3), iter(batches), 1, evaluate=lambda: {"val_loss": 0.0},
                 select="-val_loss", device=torch.device("cpu"), log=MetricsLog(None), quiet=True)
    assert result.steps == 3 and result.skipped_batches == 1 and calls["n"] == 4


def test_warmup_then_decay_schedule(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=64, max_len=16, d_model=16, n_heads=2, num_layers=1, d_ff=16,
                                      num_experts=0, dropout=0.0))
    fit(model, TrainConfig(max_steps=20, warmup_ratio=0.25, lr=1e-2, min_lr_ratio=0.1, log_every=1),
        iter(lm_batches(20, 2)), 20, evaluate=lambda: {"val_loss": 0.0}, select="-val_loss",
        device=torch.device("cpu"), log=log, quiet=True)
    rows = [r["lr"] for r in log.rows if "lr" in r]
    peak = rows.index(max(rows))
    assert 3 <= peak <= 6 and max(rows) == pytest.approx(1e-2, rel=0.05)
    assert all(a <= b for a, b in zip(rows[:peak], rows[1:peak + 1]))
    assert all(a >= b for a, b in zip(rows[peak:], rows[peak + 1:])) and rows[-1] < 0.2e-2


def test_resume_continues_exactly(tmp_path, pairs_file):
    common = ["--train", "--task", "seq2seq", "--preset", "tiny", "--data", pairs_file, "--max_steps", "12",
              "--set", "vocab_size=300", "--set", "dropout=0.1", "--set", "eval_every=4", "--set", "log_every=2",
              "--quiet"]

    def run(name, *extra):
        d = tmp_path / name
        assert main.main(common + ["--checkpoint", str(d / "m.pt"), "--out_dir", str(d), *extra]) == 0
        return d

    straight = run("straight")
    run("halted", "--set", "halt_after=6")
    assert torch.load(last_path(str(tmp_path / "halted" / "m.pt")), weights_only=True)["resume"]["step"] == 6
    resumed = run("halted", "--resume")
    rows = {name: [r for r in MetricsLog.read(str(d / "metrics.jsonl")) if "train_loss" in r]
            for name, d in (("a", straight), ("b", resumed))}
    assert [r["step"] for r in rows["b"]] == [2, 4, 6, 8, 10, 12]
    for ra, rb in zip(rows["a"], rows["b"]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-5)
    a = torch.load(last_path(str(straight / "m.pt")), weights_only=True)["state_dict"]
    b = torch.load(last_path(str(resumed / "m.pt")), weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains_on_cpu(tmp_path, pairs_file, capsys):
    """bf16 autocast (with accumulation and gradient checkpointing) follows the fp32 run of the same seed."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        assert main.main(["--train", "--task", "seq2seq", "--preset", "tiny", "--data", pairs_file, "--max_steps",
                          "6", "--dtype", dtype, "--set", "vocab_size=300", "--set", "accum_steps=2", "--set",
                          "grad_checkpoint=true", "--checkpoint", str(tmp_path / dtype / "m.pt"), "--out_dir",
                          str(tmp_path / dtype), "--quiet"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        rows = MetricsLog.read(str(tmp_path / dtype / "metrics.jsonl"))
        losses[dtype] = [r["train_loss"] for r in rows if "train_loss" in r] + [summary["val_loss"]]
        assert summary["steps"] == 6
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-3)  # 2e-5 measured


def test_fp16_on_cpu_and_resume_without_state_fail_with_one_line(tmp_path, pairs_file):
    for extra, message in ((["--dtype", "fp16"], "fp16 needs a CUDA device"),
                           (["--resume"], "no checkpoint; train one first")):
        proc = run_main("--train", "--task", "seq2seq", "--preset", "tiny", "--data", pairs_file, "--checkpoint",
                        str(tmp_path / "m.pt"), "--out_dir", str(tmp_path / "run"), "--device", "cpu", *extra,
                        check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()  # a refused run leaves no run folder behind


def test_checkpointer_keeps_the_best_and_the_resume_state(tmp_path):
    scores = iter([0.5, 0.3, 0.4])  # val_loss of the three evaluations: the second is the best
    checkpointer = Checkpointer(lambda metrics: {"metrics": dict(metrics)}, str(tmp_path / "best.pt"),
                                str(tmp_path / "last.pt"))
    result = fit(tiny_fit_model(), TrainConfig(max_steps=3, eval_every=1, warmup_ratio=0.0), iter(lm_batches(3, 2)),
                 1, evaluate=lambda: {"val_loss": next(scores)}, select="-val_loss", device=torch.device("cpu"),
                 log=MetricsLog(None), checkpointer=checkpointer, quiet=True)
    assert (result.best["val_loss"], result.best["step"], result.steps, result.halted) == (0.3, 2, 3, False)
    best = load_checkpoint(tmp_path / "best.pt", "")
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (best["metrics"]["val_loss"], best["metrics"]["step"]) == (0.3, 2) and "resume" not in best
    assert last["resume"]["step"] == 3 and last["resume"]["best"]["val_loss"] == 0.3
