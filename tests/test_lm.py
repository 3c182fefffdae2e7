"""The language model: KV cache, sampling filters, determinism, and main.py end to end on the tiny preset."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint, load_trained
from config import LMConfig
from data import news_splits
from models import LanguageModel
from sampling import filter_logits, sample_next
from shards import TokenStream
from test_cli import ROOT, run_main


def tiny_lm(**kw):
    base = dict(vocab_size=64, max_len=24, d_model=32, n_heads=2, num_layers=2, d_ff=32, num_experts=4, top_k=2,
                dropout=0.0, noisy_gate=True)
    base.update(kw)
    return LanguageModel(LMConfig(**base)).eval()


@pytest.mark.parametrize("moe_layers", ["all", "odd"])
def test_cached_decoding_equals_full_forward(moe_layers):
    torch.manual_seed(0)
    model = tiny_lm(moe_layers=moe_layers)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full, _, _ = model(idx)
        caches = [{} for _ in model.blocks]
        prefix, _, _ = model(idx[:, :7], caches=caches)  # prefill, then one token at a time
        steps = [prefix]
        for t in range(7, 20):
            out, _, _ = model(idx[:, t:t + 1], caches=caches)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cached_and_uncached_generation_agree():
    torch.manual_seed(0)
    model = tiny_lm()
    prompt = torch.randint(0, 64, (1, 5))
    a = list(model.generate(prompt, 40, temperature=0))  # runs past max_len: exercises the window re-encode
    b = list(model.generate(prompt, 40, temperature=0, use_cache=False))
    assert a == b and len(a) == 40


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert kept == [True, True, False, False, False]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 and 0.05 are cut
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist()
    assert kept == [True, False, False, False, False]
    # shuffled order: the filter follows probability, not position
    perm = torch.tensor([3, 0, 4, 2, 1])
    kept = torch.isfinite(filter_logits(logits[:, perm], top_p=0.8))[0].tolist()
    assert kept == [False, True, False, True, True]
    assert sample_next(logits, 0.0, 0, 1.0).item() == 0  # temperature 0 is greedy
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, 1.0, g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_same_seed_same_text():
    model = tiny_lm()
    prompt = torch.tensor([[1, 2, 3]])
    runs = [list(model.generate(prompt, 30, 1.0, 0, 0.9, generator=torch.Generator().manual_seed(s)))
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_lm_training_lowers_loss_and_writes_outputs(trained_lm):
    ckpt, out, summary = trained_lm
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert sum(train_losses[-3:]) / 3 < sum(train_losses[:3]) / 3 - 0.5
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]
    assert summary["val_loss"] == min(val)
    _, tokenizer, _ = load_trained(ckpt, "lm", "", "cpu")  # bits per character: nats per token x tokens/char
    test = TokenStream.of_texts(tokenizer, news_splits(quiet=True)["test"])
    bpc = summary["test_loss"] * len(test) / test.chars / math.log(2)
    assert summary["test_bpc"] == pytest.approx(bpc, rel=1e-9)
    for png in ("loss_curve.png", "expert_heatmap.png"):
        assert os.path.getsize(os.path.join(out, png)) > 10_000
    data = load_checkpoint(ckpt, "")
    assert data["task"] == "lm" and "causal" not in data["model_config"] and "pooling" not in data["model_config"]


def test_generate_through_main(trained_lm, tmp_path):
    ckpt, _, _ = trained_lm
    args = ("--generate", "--checkpoint", ckpt, "--out_dir", str(tmp_path), "--prompt", "中国", "--max_new_tokens",
            "20", "--seed", "3")
    first = run_main(*args)
    text = (tmp_path / "generated_text.txt").read_text(encoding="utf-8")
    assert text.startswith("中国") and len(text.strip()) > 2
    assert first.stdout.startswith("中国")
    assert run_main(*args).stdout == first.stdout  # same seed, same text
    greedy = run_main(*args, "--temperature", "0", "--num_samples", "2").stdout
    samples = greedy.split("--- sample ")[1:]
    assert len(samples) == 2 and samples[0].split("\n", 1)[1] == samples[1].split("\n", 1)[1]


def test_generate_runs_past_end_of_text_unless_told_to_stop(trained_lm, tmp_path):
    """--max_new_tokens 200 gives 200 tokens: an end-of-text is a paragraph break; --stop_at_eos ends there."""
    ckpt, _, _ = trained_lm
    args = ("--generate", "--checkpoint", ckpt, "--out_dir", str(tmp_path), "--max_new_tokens", "200", "--seed", "1")
    full = run_main(*args)
    assert json.loads(full.stderr.strip().splitlines()[-1])["new_tokens"] == 200
    text = (tmp_path / "generated_text.txt").read_text(encoding="utf-8").rstrip("\n")
    assert "\n" in text  # the tiny model ends a paragraph within 200 tokens: the text went on after it
    stopped = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args, "--stop_at_eos"],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert stopped.returncode == 0
    assert stopped.stdout.rstrip("\n") == text.split("\n")[0]  # same seed: the same first paragraph, then stop
    assert "stopped at end-of-text after" in stopped.stderr
    assert json.loads(stopped.stderr.strip().splitlines()[-1])["new_tokens"] < 200


def test_long_prompt_is_cropped(trained_lm, tmp_path):
    ckpt, _, _ = trained_lm
    proc = run_main("--generate", "--checkpoint", ckpt, "--out_dir", str(tmp_path), "--prompt", "人民" * 200,
                    "--max_new_tokens", "5")
    assert "keeping the last" in proc.stderr


def test_eval_on_a_text_file(trained_lm, tmp_path):
    ckpt, _, _ = trained_lm
    src = tmp_path / "held_out.txt"
    src.write_text("新华社北京一月一日电。\n" * 30, encoding="utf-8")
    res = json.loads(run_main("--eval", "--task", "lm", "--checkpoint", ckpt, "--input", str(src)).stdout)
    assert res["chars"] == 30 * len("新华社北京一月一日电。\n")
    assert math.isfinite(res["loss"]) and res["bpc"] == pytest.approx(
        res["loss"] * res["tokens"] / res["chars"] / math.log(2))


def test_char_tokenizer_and_user_text(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(f"第{i}天，我们一起学习混合专家模型。" for i in range(200)), encoding="utf-8")
    ckpt = str(tmp_path / "m.pt")
    proc = run_main("--train", "--task", "lm", "--preset", "tiny", "--data", str(src), "--tokenizer", "char",
                    "--checkpoint", ckpt, "--out_dir", str(tmp_path / "run"), "--max_steps", "10")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokenizer"] == "char"
    assert load_checkpoint(ckpt, "")["tokenizer"]["kind"] == "char"


@pytest.mark.parametrize("content,expect", [
    (b"", "file is empty"),
    (b"\x00\x01\x02binary\x00", "binary"),
    ("只有一行\n".encode(), "too few to hold out val and test"),
    ("\xff\xfe".encode("latin-1"), "not UTF-8"),
])
def test_bad_lm_data(tmp_path, content, expect):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    proc = run_main("--train", "--task", "lm", "--preset", "tiny", "--data", str(src),
                    "--checkpoint", str(tmp_path / "m.pt"), check=False)
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_missing_lm_checkpoint_says_how_to_train():
    proc = run_main("--generate", "--checkpoint", "/nonexistent/lm.pt", check=False)
    assert proc.returncode == 2 and "python main.py --train --task lm" in proc.stderr


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path):
    """--compile trains the same model as eager mode (the router noise is off: compiled RNG differs)."""
    common = ("--train", "--task", "lm", "--preset", "tiny", "--max_steps", "20", "--set", "noisy_gate=false")
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile", "on"))):
        proc = run_main(*common, *extra, "--checkpoint", str(tmp_path / f"{name}.pt"),
                        "--out_dir", str(tmp_path / name))
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["compiled"]["steps"] == runs["eager"]["steps"] == 20
    assert runs["compiled"]["val_loss"] == pytest.approx(runs["eager"]["val_loss"], abs=1e-4)
    assert load_checkpoint(tmp_path / "compiled.pt", "")["train_config"]["compile"] == "on"
    rows = [json.loads(line) for line in open(tmp_path / "compiled" / "metrics.jsonl", encoding="utf-8")]
    logged = [r for r in rows if "expert_load" in r]  # the compiled MoE still returns its routing statistics
    assert logged and all(len(r["expert_load"]) == 2 and r["aux_balance"] > 0.5 for r in logged)


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, capsys):
    import main

    def broken_compile(model, **kw):
        def fail(*a, **k):
            raise RuntimeError("no compiler here\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert main.main(["--train", "--task", "lm", "--preset", "tiny", "--max_steps", "6", "--compile", "on",
                      "--checkpoint", str(tmp_path / "lm.pt"), "--out_dir", str(tmp_path / "run"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: torch.compile failed (RuntimeError: no compiler here); training eagerly" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["steps"] == 6


@pytest.mark.slow
def test_sigterm_saves_resume_state_and_lock_refuses_a_second_writer(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from test_cli import ROOT
    ckpt = tmp_path / "lm.pt"
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--train", "--task", "lm", "--preset", "tiny",
           "--max_steps", "100000", "--set", "eval_every=5", "--checkpoint", str(ckpt), "--out_dir",
           str(tmp_path / "run"), "--quiet"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "lm.last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert last.exists(), first.stderr.read() if first.poll() is not None else "no resume state after 120 s"
    second = run_main("--train", "--task", "lm", "--preset", "tiny", "--max_steps", "3", "--checkpoint", str(ckpt),
                      "--out_dir", str(tmp_path / "run2"), check=False)
    assert second.returncode == 2 and f"another run (pid {first.pid}) is writing it" in second.stderr
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "add --resume to go on" in err and "Traceback" not in err
    assert not (tmp_path / "lm.pt.lock").exists()
    state = torch.load(last, weights_only=True)
    assert state["resume"]["step"] >= 5
    # the lock went with its run, and one left behind by a dead run is taken over
    (tmp_path / "lm.pt.lock").write_text(str(first.pid))
    run_main("--train", "--task", "lm", "--preset", "tiny", "--max_steps", "3", "--checkpoint", str(ckpt),
             "--out_dir", str(tmp_path / "run2"))
    assert not (tmp_path / "lm.pt.lock").exists()


@pytest.mark.slow
def test_muon_optimizer_trains_and_resumes(tmp_path):
    ckpt = str(tmp_path / "lm.pt")
    args = ("--train", "--task", "lm", "--preset", "tiny", "--optimizer", "muon", "--checkpoint", ckpt,
            "--out_dir", str(tmp_path / "run"))
    run_main(*args, "--set", "halt_after=20")
    state = torch.load(str(tmp_path / "lm.last.pt"), weights_only=True)["resume"]["optimizer"]["state"]
    assert any("momentum_buffer" in s for s in state.values()) and any("exp_avg" in s for s in state.values())
    summary = json.loads(run_main(*args, "--resume").stdout.strip().splitlines()[-1])
    assert summary["steps"] == 60 and summary["val_loss"] < 5.5  # tiny LM starts at ln(400) = 6.0


SHAPE = ["--set", "budget_batch=[[100, 8], [420, 16, 96]]"]  # another rule, to test the mechanism on its own


@pytest.mark.parametrize("argv,batch,context,max_steps", [
    ([], 32, 128, 730),                                             # the preset: a step count, no clock
    (["--time_budget", "60"], 8, 128, 0),                           # a short budget: many small steps
    (["--time_budget", "300"], 32, 64, 0),                          # middle budgets: shorter contexts
    (["--time_budget", "900"], 32, 128, 0),                         # long enough for the preset's batch
    (["--time_budget", "60", "--batch_size", "12"], 12, 128, 0),    # an explicit batch wins
    (["--time_budget", "60", "--set", "batch_size=24"], 24, 128, 0),
    (["--time_budget", "60", "--max_steps", "50"], 8, 128, 50),     # both limits: whichever comes first
    (["--time_budget", "60", "--preset", "babygpt"], 12, 64, 0),    # the baseline recipe keeps its own batch
    (["--time_budget", "300", *SHAPE], 16, 96, 0),
    (["--time_budget", "300", *SHAPE, "--set", "max_len=80", "--batch_size", "4"], 4, 80, 0),  # explicit wins
    (["--time_budget", "60", *SHAPE], 8, 128, 0),                   # an entry without a context keeps it
    (SHAPE, 32, 128, 730),                                          # no budget, no rule
])
def test_time_budget_picks_the_batch_and_ends_on_the_clock(argv, batch, context, max_steps):
    assert budget_configs(argv)[:3] == (batch, context, max_steps)


def budget_configs(argv: list[str]) -> tuple:
    import main
    args = main.build_parser().parse_args(["--train", "--task", "lm", *argv])
    _, model_cfg, train_cfg = main.resolve_config("lm", args.preset, main.config_flags(args), args.set)
    return train_cfg.batch_size, model_cfg.max_len, train_cfg.max_steps, train_cfg.muon_experts


@pytest.mark.parametrize("argv,muon_experts", [
    ([], True),                                                     # the preset: Muon for every hidden matrix
    (["--time_budget", "60"], False),                               # a short budget: AdamW for the experts
    (["--time_budget", "300"], True),
    (["--time_budget", "60", "--set", "muon_experts=true"], True),  # explicit wins
    (["--set", "muon_experts=false"], False),
    (["--time_budget", "60", "--set", "adamw_experts_below=0"], True),
])
def test_time_budget_picks_the_experts_optimizer(argv, muon_experts):
    assert budget_configs(argv)[3] is muon_experts


def test_upcycling_a_dense_checkpoint_through_main(tmp_path):
    """--init_from: a dense tiny LM becomes an MoE that starts where it stopped (the dense val loss, not a fresh
    model's), with its tokenizer and experts as wide as its FFN; the wrong sources are one-line errors."""
    def train(name, *flags):
        proc = run_main("--train", "--task", "lm", "--preset", "tiny", "--checkpoint", str(tmp_path / f"{name}.pt"),
                        "--out_dir", str(tmp_path / name), *flags)
        return str(tmp_path / f"{name}.pt"), json.loads(proc.stdout.strip().splitlines()[-1])

    dense, dense_run = train("dense", "--num_experts", "0", "--max_steps", "60")
    upcycled, up_run = train("up", "--init_from", dense, "--max_steps", "2", "--lr", "1e-4", "--set", "moe_layers=odd")
    _, fresh_run = train("fresh", "--max_steps", "2", "--lr", "1e-4")
    assert up_run["val_loss"] < dense_run["val_loss"] + 0.05 < fresh_run["val_loss"] - 0.5
    saved, source = load_checkpoint(upcycled, ""), load_checkpoint(dense, "")
    assert saved["model_config"]["num_experts"] == 4 and saved["model_config"]["moe_layers"] == "odd"
    assert saved["model_config"]["d_ff"] == saved["model_config"]["dense_ff"] == 64  # the dense width, top_k * 32
    assert saved["train_config"]["init_from"] == dense and saved["tokenizer"] == source["tokenizer"]
    for flags, message in ((["--init_from", upcycled], "MoE already"),
                           (["--init_from", dense, "--num_experts", "0"], "upcycling builds an MoE"),
                           (["--init_from", str(tmp_path / "none.pt")], "no checkpoint")):
        bad = run_main("--train", "--task", "lm", "--preset", "tiny", "--checkpoint", str(tmp_path / "x.pt"),
                       *flags, check=False)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
    bad = run_main("--train", "--task", "seq2seq", "--preset", "tiny", "--init_from", dense,
                   "--checkpoint", str(tmp_path / "x.pt"), check=False)
    assert bad.returncode == 2 and "a 'lm' checkpoint, not a 'seq2seq' one" in bad.stderr
    bad = run_main("--analyze", "--checkpoint", dense, "--out_dir", str(tmp_path / "an"), check=False)
    assert bad.returncode == 2 and "dense model" in bad.stderr
