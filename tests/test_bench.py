"""The GPU check (`bench.py --only gpu`) and the gpu presets, run on CPU at a reduced size: the code paths a lent
GPU will take, so that the day one is lent the check runs as it is."""
import json

import pytest

import bench
import main

REDUCED = ["--set", "d_model=32", "--set", "n_heads=2", "--set", "num_layers=1", "--set", "d_ff=32",
           "--set", "num_experts=4", "--set", "vocab_size=400", "--set", "compile=off"]


def test_the_gpu_check_runs_on_cpu_at_tiny_size(capsys):
    assert bench.main(["--only", "gpu", "--device", "cpu", "--gpu_preset", "tiny", "--gpu_steps", "2",
                       "--gpu_compile", "off"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for task in ("cls", "lm", "seq2seq"):
        moe, dense = result[f"gpu_{task}_moe_eager_step_ms"], result[f"gpu_{task}_dense_eager_step_ms"]
        assert moe > 0 and dense > 0 and result[f"gpu_{task}_moe_eager_tokens_per_s"] > 0
        assert result[f"gpu_{task}_moe_over_dense_eager"] == pytest.approx(moe / dense, rel=1e-2)
        assert f"gpu_{task}_fp16_steps" not in result  # fp16 training and the induced OOM are CUDA-only


@pytest.mark.parametrize("task", ["cls", "lm", "seq2seq"])
def test_the_gpu_presets_load_and_train_on_cpu_at_reduced_size(task, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    phases = ["--set", "pretrain_steps=2"] if task == "cls" else []
    assert main.main(["--train", "--task", task, "--preset", "gpu", "--max_steps", "2", "--batch_size", "4",
                      "--set", "eval_every=2", "--quiet", *REDUCED, *phases]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((tmp_path / summary["out_dir"] / "config.json").read_text())
    assert summary["steps"] == 2 and config["train"]["dtype"] == "bf16" and config["model"]["num_experts"] == 4
    assert summary["peak_rss_mb"] > 100  # the process's peak resident memory is reported


def test_the_profile_splits_a_training_step_and_writes_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--only", "profile", "--presets", "lm:tiny:4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shares = [result[f"profile_lm_tiny_b4_{k}_share"] for k in ("data", "forward", "backward", "clip", "optimizer")]
    assert sum(shares) == pytest.approx(1.0, abs=0.005)  # the JSON rounds to 3 digits
    assert min(shares[1], shares[2], shares[4]) > 0.01  # forward, backward, optimizer
    assert 0 < result["profile_lm_tiny_b4_moe_forward_share"] < result["profile_lm_tiny_b4_forward_share"]
    assert "aten::" in (tmp_path / "runs" / "bench_profile" / "lm_tiny_b4.txt").read_text()


def test_the_scale_benchmark_writes_a_labelled_table_and_runs_the_classifier_on_it(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    bench.synthetic_table(str(path), 0.3)
    import pandas as pd
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert 0.28e6 < path.stat().st_size < 0.32e6 and df.text.is_unique
    assert set(df.label) == {"negative", "positive"} and all("，" in t for t in df.text[:50])
    monkeypatch.chdir(tmp_path)
    result = bench.bench_scale(sizes=(0.2,), steps=2, tasks=("cls",))
    assert result["scale_cls_cached_first_step_s_0.2MB"] > 0 and result["scale_cls_steps_per_s_0.2MB"] > 0
    assert result["scale_cls_peak_rss_mb_cold_0.2MB"] > 100 and (tmp_path / "runs/bench_scale/scale.png").exists()
