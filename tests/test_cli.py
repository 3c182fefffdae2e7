"""main.py end to end, as a user runs it, on the tiny preset and real data."""
import contextlib
import io
import json
import os
import subprocess
import sys
import traceback

import pandas as pd
import pytest
import torch

import task_cls
from checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "reviews_small.csv")


def run_script(*args, check=True) -> subprocess.CompletedProcess:
    """`python main.py <args> --quiet` in its own process, from the repository root."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args, "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def run_main(*args, check=True) -> subprocess.CompletedProcess:
    """The same as run_script, with main.main() called in this process: its exit code and what it printed (an
    uncaught exception is printed as a traceback with exit 1, as Python would). It saves the ~3 s torch import of a
    new process per call; the session's trained models (conftest.py) and the signal and torchrun tests use
    real processes."""
    import main
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # the default outputs (checkpoints/, runs/) land where a user in the repository gets them
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main.main([*args, "--quiet"])
            except SystemExit as e:  # argparse's way out
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
    proc = subprocess.CompletedProcess(["main.py", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{proc.stderr[-3000:]}")
    return proc


def test_train_writes_checkpoint_plots_and_summary(trained_cls):
    ckpt, out, summary = trained_cls
    assert summary["checkpoint"] == ckpt
    for png in ("loss_curve.png", "expert_heatmap.png"):
        path = os.path.join(out, png)
        assert os.path.getsize(path) > 10_000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["params_active"] < summary["params_total"]
    data = load_checkpoint(ckpt, "")
    assert data["label_names"] == ["negative", "positive"]
    assert data["model_config"]["num_experts"] == 4 and data["tokenizer"]["kind"] == "bpe"
    assert data["train_config"]["dtype"] == "fp32"  # "auto" resolved for this CPU, and recorded as such
    assert data["metrics"]["test_acc"] == summary["test_acc"]
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5  # it learned
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["val_loss"] < 0.693  # below chance-level cross-entropy on the real validation split
    assert summary["val_acc"] > 0.6
    assert all(len(r["expert_load"]) == 1 and abs(sum(r["expert_load"][0]) - 1) < 1e-5
               for r in rows if "expert_load" in r)


def test_infer_json_and_table(trained_cls):
    ckpt, _, _ = trained_cls
    res = json.loads(run_main("--infer", "--text", "我爱编程", "--json", "--checkpoint", ckpt).stdout)
    assert res["label"] in ("negative", "positive")
    assert set(res["probs"]) == {"negative", "positive"}
    assert abs(sum(res["probs"].values()) - 1) < 1e-5
    assert res["probs"][res["label"]] == max(res["probs"].values())
    table = run_main("--infer", "--text", "这本书太差了，浪费钱", "--checkpoint", ckpt).stdout
    assert table.startswith("label: ") and "negative" in table and "positive" in table


def test_infer_long_text_is_truncated_with_notice(trained_cls):
    ckpt, _, _ = trained_cls
    proc = run_main("--infer", "--text", "很好" * 500, "--json", "--checkpoint", ckpt)
    assert "only the first" in proc.stderr
    assert json.loads(proc.stdout)["label"] in ("negative", "positive")


def test_classify_with_labels(trained_cls, tmp_path):
    ckpt, _, _ = trained_cls
    src = tmp_path / "in.csv"
    df = pd.read_csv(FIXTURE)
    df["label"] = df["label"].map({"好评": "positive", "差评": "negative"})
    df.insert(0, "id", range(len(df)))
    df.to_csv(src, index=False)
    preds = tmp_path / "preds.csv"
    run_dir = tmp_path / "not" / "yet"  # --out_dir need not exist: the confusion matrix goes there
    proc = run_main("--classify", "--input", str(src), "--output", str(preds), "--checkpoint", ckpt,
                    "--out_dir", str(run_dir))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    out = pd.read_csv(preds)
    assert list(out.columns) == ["id", "text", "label", "pred", "unsure", "prob_negative", "prob_positive"]
    assert len(out) == len(df) and out.id.tolist() == df.id.tolist()
    assert ((out.prob_negative + out.prob_positive - 1).abs() < 1e-5).all()
    assert summary["accuracy"] == pytest.approx((out.pred == out.label).mean())
    assert "precision" in proc.stderr  # the classification report
    assert os.path.getsize(run_dir / "confusion_matrix.png") > 5_000


def test_classify_without_labels_other_text_column(trained_cls, tmp_path):
    ckpt, _, _ = trained_cls
    src = tmp_path / "in.jsonl"
    src.write_text('{"review": "房间很干净"}\n{"review": "太难用了"}\n', encoding="utf-8")
    proc = run_main("--classify", "--input", str(src), "--text_col", "review", "--checkpoint", ckpt,
                    "--out_dir", str(tmp_path))
    summary = json.loads(proc.stdout)
    assert "accuracy" not in summary
    assert pd.read_csv(summary["output"]).pred.isin(["negative", "positive"]).all()


def test_train_on_user_data_with_string_labels(tmp_path):
    ckpt = str(tmp_path / "m.pt")
    proc = run_main("--train", "--preset", "tiny", "--data", FIXTURE, "--checkpoint", ckpt,
                    "--out_dir", str(tmp_path / "run"), "--max_steps", "4", "--set", "eval_every=2",
                    "--set", "vocab_size=300", "--num_layers", "0")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4
    assert load_checkpoint(ckpt, "")["label_names"] == ["好评", "差评"]
    res = json.loads(run_main("--infer", "--text", "很好", "--json", "--checkpoint", ckpt).stdout)
    assert set(res["probs"]) == {"好评", "差评"}


def test_fractional_labels_warn(tmp_path):
    rows = [("很好很满意", "0.5"), ("太差了不会再来", "1.7")] * 6
    src = bad(tmp_path, "d.csv", ("text,label\n" + "".join(f"{t}{i},{l}\n" for i, (t, l) in enumerate(rows))).encode())
    proc = run_main("--train", "--preset", "tiny", "--data", src, "--checkpoint", str(tmp_path / "m.pt"),
                    "--out_dir", str(tmp_path / "run"), "--max_steps", "2", "--set", "vocab_size=300",
                    "--num_layers", "0")
    assert "fractional numbers (0.5, 1.7)" in proc.stderr
    assert load_checkpoint(tmp_path / "m.pt", "")["label_names"] == ["0.5", "1.7"]


# ---- bad input: one line on stderr, exit code 2, no traceback, nothing written

def bad(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("case,expect", [
    ("missing", "file not found"),
    ("format", "unknown format"),
    ("column", "missing column 'text'"),
    ("empty", "file is empty"),
    ("one_class", "only one class"),
    ("non_utf8", "not UTF-8"),
    ("no_rows", "no rows"),
    ("empty_labels", "empty or NaN 'label' in data row(s) 3, 4"),
])
def test_bad_training_data(tmp_path, case, expect):
    contents = {
        "format": ("d.xlsx", b"x"),
        "column": ("d.csv", "review,label\n好,1\n".encode()),
        "empty": ("d.csv", b""),
        "one_class": ("d.csv", "text,label\n好,1\n很好,1\n不错,1\n".encode()),
        "non_utf8": ("d.csv", "text,label\n好,1\n".encode("gbk")),
        "no_rows": ("d.csv", b"text,label\n"),
        "empty_labels": ("d.csv", "text,label\n好,0.5\n很好,1.7\n不错,\n差,nan\n".encode()),
    }
    path = str(tmp_path / "nope.csv") if case == "missing" else bad(tmp_path, *contents[case])
    ckpt = tmp_path / "m.pt"
    proc = run_main("--train", "--preset", "tiny", "--data", path, "--checkpoint", str(ckpt), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in proc.stderr
    assert not ckpt.exists()


FIXTURE_ARGS = ["--preset", "tiny", "--data", FIXTURE]
BAD_ARGUMENTS = [  # (argv, what the one-line error must say)
    # modes and flags argparse refuses: one line, not the usage block
    ([], "one of the arguments --train"),
    (["--train", "--generate"], "not allowed with argument --train"),
    (["--train", "--task", "foo"], "invalid choice: 'foo'"),
    (["--train", "--batch_size", "abc"], "invalid int value: 'abc'"),
    (["--train", "--tokenizer", "wordpiece"], "invalid choice: 'wordpiece'"),
    (["--export", "tflite"], "invalid choice: 'tflite'"),
    (["--generate", "--top_k", "abc"], "invalid int value: 'abc'"),
    # modes that do not fit the task
    (["--infer", "--task", "lm", "--text", "x"],
     "--infer is for --task cls or seq2seq; --task lm has --generate, --eval"),
    (["--generate", "--task", "cls"], "--generate is for --task lm; --task cls has --infer, --classify"),
    (["--eval", "--task", "lm"], "--eval needs --input FILE"),
    (["--infer", "--resume", "--text", "x"], "--resume works with --train"),
    (["--export", "onnx", "--task", "seq2seq"], "--task seq2seq does not export"),
    (["--infer"], "empty text"),
    (["--infer", "--text", "   "], "empty text"),
    (["--classify"], "--classify needs --input FILE"),
    (["--classify", "--checkpoint", "/nonexistent/x.pt"], "--input"),
    # missing checkpoints name the command that makes one
    (["--infer", "--text", "好", "--checkpoint", "/nonexistent/x.pt"], "python main.py --train --task cls"),
    (["--generate", "--checkpoint", "/nonexistent/lm.pt"], "python main.py --train --task lm"),
    (["--train", "--resume", "--preset", "tiny", "--checkpoint", "/nonexistent/m.pt"], "m.last.pt: no checkpoint"),
    # presets and --set
    (["--train", "--preset", "huge"], "no preset 'huge'"),
    (["--train", "--set", "d_modle=64"], "unknown key"),
    (["--train", "--set", "foo"], "expected KEY=VALUE"),
    (["--train", "--set", "top_k=abc"], "expected a int"),
    (["--train", "--task", "seq2seq", "--set", "rope=maybe"], "expected a bool"),
    (["--train", "--task", "lm", "--set", "rope=true"], "--set rope: a setting of the seq2seq model, not of --task lm"),
    (["--train", "--task", "lm", "--set", "pooling=mean"], "--set pooling: a setting of the cls model, not of --task lm"),
    (["--train", "--task", "lm", "--set", "pretrain_steps=5"], "a setting of --task cls training, not of --task lm"),
    (["--train", "--set", "lexicon_pairs=5"], "--set lexicon_pairs: a setting of --task seq2seq training"),
    # model config values
    (["--train", "--top_k", "9"], "top_k=9"),
    (["--train", "--set", "top_k=0"], "top_k=0 must be between 1 and num_experts=8"),
    (["--train", "--set", "num_experts=-1"], "num_experts=-1 must be >= 0"),
    (["--train", "--set", "vocab_size=0"], "vocab_size=0 must be >= 1"),
    (["--train", "--set", "max_len=1"], "max_len=1 must be >= 2"),
    (["--train", "--set", "n_heads=0"], "n_heads=0 must be >= 1"),
    (["--train", "--set", "d_model=130"], "d_model=130 is not divisible by n_heads=4"),
    (["--train", "--set", "d_ff=0"], "d_ff=0 must be >= 1"),
    (["--train", "--set", "num_classes=0"], "num_classes=0 must be >= 1"),
    (["--train", "--task", "seq2seq", "--set", "decoder_layers=-1"], "decoder_layers=-1 must be >= 0"),
    (["--train", "--set", "dropout=1.5"], "dropout=1.5 must be in [0, 1)"),
    (["--train", "--set", "moe_layers=oddd"], "moe_layers='oddd' must be all, none, odd or layer indices"),
    (["--train", "--preset", "tiny", "--set", "moe_layers=7"], "layer indices below 1"),
    (["--train", "--set", "pooling=max"], "pooling='max' must be 'cls' or 'mean'"),
    (["--train", "--set", "capacity_factor=-1"], "capacity_factor=-1.0 must be a number >= 0"),
    (["--infer", "--task", "seq2seq", "--text", "ni hao", "--word_prior", "-1"], "--word_prior -1.0: must be a number >= 0"),
    (["--infer", "--task", "seq2seq", "--text", "ni hao", "--fusion", "nan"], "--fusion nan: must be a number >= 0"),
    (["--train", "--set", "balance=none"], "balance='none' must be 'loss' or 'bias'"),
    (["--train", "--set", "bias_rate=-0.1"], "bias_rate=-0.1 must be a number >= 0"),
    (["--train", "--set", "balance_coef=nan"], "balance_coef=nan must be a number >= 0"),
    (["--train", "--set", "noise_init=0"], "noise_init=0.0 must be > 0"),
    (["--train", "--set", "moe_impl=fast"], "moe_impl='fast'"),
    # training config values
    (["--train", "--batch_size", "0"], "batch_size=0 must be >= 1"),
    (["--train", "--preset", "tiny", "--max_steps", "5", "--batch_size", "-4"], "batch_size=-4 must be >= 1"),
    (["--train", "--lr", "-1"], "lr=-1.0 must be a number > 0"),
    (["--train", "--lr", "nan"], "lr=nan must be a number > 0"),
    (["--train", "--set", "lr=0"], "lr=0.0 must be a number > 0"),
    (["--train", "--max_steps", "-5"], "--max_steps -5: must be > 0"),
    (["--train", "--max_steps", "0"], "--max_steps 0: must be > 0"),
    (["--train", "--epochs", "0"], "--epochs 0: must be > 0"),
    (["--train", "--task", "lm", "--time_budget", "-1"], "--time_budget -1.0: must be > 0"),
    (["--train", "--set", "time_budget=-5"], "time_budget=-5.0 must be a number >= 0"),
    (["--train", "--task", "lm", "--set", "adamw_experts_below=-1"], "adamw_experts_below=-1.0 must be a number >= 0"),
    (["--train", "--task", "lm", "--time_budget", "60", "--set", "budget_batch=[[100, 8, 0]]"],
     "budget_batch=[[100, 8, 0]] must be [seconds, batch] or [seconds, batch, context]"),
    (["--train", "--task", "lm", "--time_budget", "60", "--set", "budget_batch=[5]"], "budget_batch"),
    (["--train", "--set", "weight_decay=inf"], "weight_decay=inf must be a number >= 0"),
    (["--train", "--set", "grad_clip=nan"], "grad_clip=nan must be a number >= 0"),
    (["--train", "--set", "warmup_ratio=2"], "warmup_ratio=2.0 must be <= 1"),
    (["--train", "--set", "min_lr_ratio=2"], "min_lr_ratio=2.0 must be <= 1"),
    (["--train", "--set", "label_smoothing=1"], "label_smoothing=1.0 must be < 1"),
    (["--train", "--set", "betas=[0.9]"], "betas=[0.9] must be two numbers in [0, 1)"),
    (["--train", "--set", "accum_steps=0"], "accum_steps=0 must be >= 1"),
    (["--train", "--set", "log_every=0"], "log_every=0 must be >= 1"),
    (["--train", "--set", "muon_steps=0"], "muon_steps=0 must be >= 1"),
    (["--train", "--set", "eval_every=-1"], "eval_every=-1 must be >= 0"),
    (["--train", "--set", "halt_after=-1"], "halt_after=-1 must be >= 0"),
    (["--train", "--set", "pretrain_steps=-1"], "pretrain_steps=-1 must be >= 0"),
    (["--train", "--task", "seq2seq", "--set", "lexicon_pairs=-1"], "lexicon_pairs=-1 must be >= 0"),
    (["--train", "--set", "optimizer=sgd"], "optimizer='sgd' must be adamw or muon"),
    (["--train", "--set", "pretrain_optimizer=sgd"], "pretrain_optimizer='sgd' must be adamw or muon"),
    (["--train", "--set", "tokenizer=word"], "tokenizer='word' must be bpe, bpe_hanzi or char"),
    (["--train", "--set", "dtype=fp8"], "dtype='fp8' must be auto, fp32, bf16 or fp16"),
    (["--train", "--set", "compile=maybe"], "compile='maybe' must be auto, on or off"),
    (["--train", "--device", "cuda"], "--device cuda: no CUDA device is available"),
    # data columns and folders
    ([*FIXTURE_ARGS, "--train", "--text_col", "missing"], "missing column 'missing' (columns: text, label)"),
    ([*FIXTURE_ARGS, "--train", "--label_col", "nope"], "missing column 'nope'"),
    (["--train", "--preset", "tiny", "--data", os.path.join(ROOT, "tests")], "directory has no train/val/test"),
    # generation and decoding settings
    (["--generate", "--top_k", "-3"], "top_k >= 0"),
    (["--generate", "--temperature", "-1"], "0 <= temperature < inf"),
    (["--generate", "--top_p", "0"], "0 < top_p <= 1"),
    (["--generate", "--max_new_tokens", "0"], "max_new_tokens >= 1"),
    (["--generate", "--num_samples", "0"], "num_samples >= 1"),
    (["--infer", "--task", "seq2seq", "--text", "ni hao", "--beam", "0"], "--beam 0: must be >= 1"),
    (["--infer", "--task", "seq2seq", "--text", "ni hao", "--num_candidates", "0"], "--num_candidates 0: must be 1-16"),
    (["--infer", "--task", "seq2seq", "--text", "ni hao", "--length_penalty", "nan"], "--length_penalty nan"),
    (["--serve", "--port", "-1"], "--port -1: must be 0-65535"),
    (["--serve", "--port", "70000"], "--port 70000"),
    # unwritable outputs fail before any training or loading
    (["--train", "--preset", "tiny", "--checkpoint", "/proc/x/y.pt"], "--checkpoint /proc/x/y.pt: cannot write"),
    (["--train", "--preset", "tiny", "--checkpoint", os.path.join(ROOT, "README.md", "y.pt")],
     "README.md is a file, not a folder"),
    (["--train", "--preset", "tiny", "--checkpoint", os.path.join(ROOT, "tests")], "tests: is a directory"),
    (["--train", "--preset", "tiny", "--out_dir", "/sys/runs"], "--out_dir /sys/runs: cannot write"),
    (["--classify", "--input", "x.csv", "--output", "/sys/p.csv"], "--output /sys/p.csv: cannot write"),
    (["--classify", "--input", "x.csv", "--output", os.path.join(ROOT, "README.md", "p.csv")], "p.csv: "),
    (["--export", "onnx", "--output", "/sys/cls.onnx"], "--output /sys/cls.onnx: cannot write"),
]


@pytest.mark.parametrize("args,expect", BAD_ARGUMENTS, ids=[" ".join(a) or "no_mode" for a, _ in BAD_ARGUMENTS])
def test_bad_arguments(args, expect, tmp_path, monkeypatch, capsys):
    """In-process (a subprocess per case would cost a torch import each): exit 2, one line, no file written."""
    import main
    monkeypatch.chdir(tmp_path)  # the default outputs (checkpoints/, runs/) would land here
    try:
        code = main.main([*args, "--quiet"])
    except SystemExit as e:  # argparse's way out
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1, err
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []


@pytest.mark.parametrize("halt,optimizer", [(3, ""), (7, ""), (3, "muon")],
                         ids=["in_pretraining", "in_fine_tuning", "in_muon_pretraining"])
def test_cls_resume_continues_exactly(tmp_path, halt, optimizer):
    """An interrupted classifier run goes on in the phase it stopped in (masked-LM or fine-tuning) and ends
    with the same weights as the run that was never interrupted; also with Muon for the masked-LM phase only
    (pretrain_optimizer), whose optimizer state the resume state then holds."""
    import main
    from checkpoint import last_path
    common = ["--train", "--task", "cls", "--preset", "tiny", "--data", FIXTURE, "--max_steps", "8",
              "--set", "pretrain_epochs=1", "--set", "pretrain_steps=6", "--set", "pretrain_news=false",
              "--set", "eval_every=4", "--set", "dropout=0.1", "--set", f"pretrain_optimizer={optimizer}", "--quiet"]

    def run(name, *extra):
        d = tmp_path / name
        assert main.main(common + ["--checkpoint", str(d / "m.pt"), "--out_dir", str(d), *extra]) == 0
        return d

    straight = run("straight")
    run("halted", "--set", f"halt_after={halt}")
    state = torch.load(last_path(str(tmp_path / "halted" / "m.pt")), weights_only=True)
    assert (state["phase"], state["resume"]["step"]) == (("pretrain", 3) if halt == 3 else ("finetune", 7))
    momentum = [s for s in state["resume"]["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert bool(momentum) == (optimizer == "muon")  # Muon's state in pretraining, AdamW's in fine-tuning
    resumed = run("halted", "--resume")
    assert load_checkpoint(str(resumed / "m.pt"), "")["metrics"]["test_acc"] > 0  # the run ended
    a = torch.load(last_path(str(straight / "m.pt")), weights_only=True)  # the final weights (the best
    b = torch.load(last_path(str(resumed / "m.pt")), weights_only=True)  # checkpoint may differ: the halt evaluates)
    assert a["phase"] == b["phase"] == "finetune" and b["resume"]["step"] == 8
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], atol=1e-5, rtol=1e-5)


def test_compare_trains_both_models_for_the_same_seconds_and_writes_the_table(tmp_path):
    """--compare on the tiny classifier: the MoE stops at its step counts, the dense twin gets the seconds each
    of the MoE's phases took (masked-LM pretraining and fine-tuning), and the TF-IDF baseline joins the table."""
    from pipeline import same_seconds
    from config import TrainConfig
    proc = run_main("--compare", "--task", "cls", "--preset", "tiny", "--data", FIXTURE, "--max_steps", "6",
                    "--set", "pretrain_epochs=1", "--set", "pretrain_steps=4", "--set", "pretrain_news=false",
                    "--out_dir", str(tmp_path), "--checkpoint", str(tmp_path / "m.pt"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["moe_pretrain_steps"], summary["moe_steps"]) == (4, 6)
    # the dense twin trains for the seconds the MoE took, phase by phase: it stops at the first step past them
    for phase in ("pretrain_seconds", "train_seconds"):
        moe, dense = summary[f"moe_{phase}"], summary[f"dense_{phase}"]
        assert moe <= dense <= 1.5 * moe + 1.0, (phase, moe, dense)
    assert summary["dense_pretrain_steps"] >= 1 and summary["dense_steps"] >= 1
    splits = task_cls.load_splits(FIXTURE, "text", "label", 1337, quiet=True)
    assert summary["tfidf_svm_test_acc"] == task_cls.tfidf_baseline(splits)["test_acc"]
    rows = (tmp_path / "compare.md").read_text(encoding="utf-8").splitlines()
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["moe", "dense", "tfidf_svm"]
    assert f"| {summary['moe_test_acc']:.4f} |" in rows[2]  # accuracies to 4 places
    assert os.path.getsize(summary["compare_plot"]) > 10_000
    cfg = TrainConfig(max_steps=6, pretrain_steps=4, pretrain_epochs=1)
    later = same_seconds(cfg, {"train_seconds": 2.5, "pretrain_seconds": 1.5})
    assert (later.max_steps, later.time_budget, later.pretrain_steps, later.pretrain_seconds) == (0, 2.5, 0, 1.5)
    instant = same_seconds(cfg, {"train_seconds": 0.0, "pretrain_seconds": 0.0})  # faster than the clock reads
    assert instant.time_budget > 0 and instant.pretrain_seconds > 0  # 0 would be "no limit": a run without end
