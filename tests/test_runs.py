"""Nothing a user trained is lost: each --train in its own run folder, checkpoints/<task>.pt the latest finished
best model, what a run would replace moved aside, --resume finding the unfinished run, a lock the kernel
releases, and the provenance every checkpoint records."""
import json
import os
import subprocess
import sys

import pytest
import torch

import main
import runs
from checkpoint import load_checkpoint
from fsio import exclusive
from test_cli import ROOT

TINY = ["--train", "--task", "lm", "--preset", "tiny", "--max_steps", "6", "--set", "eval_every=3", "--quiet"]


def files(folder) -> dict:
    """{relative path: bytes} of every file under a folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def error_of(capsys, *flags) -> str:
    assert main.main([*TINY, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_second_run_leaves_the_first_one_byte_identical(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main([*TINY, "--name", "first"]) == 0
    first = files("runs/lm/first")
    assert {"model.pt", "model.last.pt", "metrics.jsonl", "config.json", "summary.json", "loss_curve.png"} <= set(first)
    assert open("checkpoints/lm.pt", "rb").read() == first["model.pt"]  # published
    assert main.main([*TINY, "--set", "lr=0.01"]) == 0  # a timestamped run
    assert files("runs/lm/first") == first
    (second,) = [d for d in os.listdir("runs/lm") if d != "first"]
    assert open("checkpoints/lm.pt", "rb").read() == open(f"runs/lm/{second}/model.pt", "rb").read()
    summary = json.loads(open(f"runs/lm/{second}/summary.json").read())
    assert summary["published"] == "checkpoints/lm.pt" and "replaced_kept_as" not in summary  # first stays in its run
    capsys.readouterr()
    assert "runs/lm/first exists" in error_of(capsys, "--name", "first")
    assert "holds a run already" in error_of(capsys, "--out_dir", "runs/lm/first")
    assert files("runs/lm/first") == first


def test_what_a_run_would_replace_is_moved_aside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("checkpoints")
    with open("checkpoints/lm.pt", "wb") as f:
        f.write(b"a model trained before run folders")
    with open("mine.pt", "wb") as f:
        f.write(b"a model at --checkpoint")
    assert main.main([*TINY, "--checkpoint", "mine.pt"]) == 0  # --checkpoint: no publishing
    assert main.main([*TINY, "--name", "b"]) == 0
    kept = sorted(p for p in os.listdir(".") if p.startswith("mine.") and p != "mine.pt" and "last" not in p)
    assert [open(p, "rb").read() for p in kept] == [b"a model at --checkpoint"]
    aside = [p for p in os.listdir("checkpoints") if p not in ("lm.pt",)]
    assert [open(os.path.join("checkpoints", p), "rb").read() for p in aside] == [b"a model trained before run folders"]
    assert load_checkpoint("checkpoints/lm.pt", "")["run_dir"] == os.path.join("runs", "lm", "b")


def test_resume_goes_on_with_the_latest_unfinished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main([*TINY, "--name", "halted", "--set", "halt_after=3"]) == 0
    assert main.main([*TINY, "--name", "done"]) == 0
    capsys.readouterr()
    assert main.main([*TINY, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out_dir"] == "runs/lm/halted"
    steps = [r["step"] for r in map(json.loads, open("runs/lm/halted/metrics.jsonl")) if "train_loss" in r]
    assert steps == sorted(steps) and steps[-1] == 6 and os.path.exists("runs/lm/halted/summary.json")
    assert "no unfinished run in runs/lm" in error_of(capsys, "--resume")
    assert "finished" in error_of(capsys, "--resume", "done")


def test_a_second_writer_of_a_run_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    with exclusive(str(out / ".lock"), f"run folder {out}"):
        err = error_of(capsys, "--out_dir", str(out), "--checkpoint", str(tmp_path / "m.pt"))
        assert f"run folder {out}: another run (pid {os.getpid()}) is writing it" in err
    # a process killed while holding the lock: the kernel releases it, the next run goes ahead
    holder = subprocess.Popen([sys.executable, "-c", "import fsio, time, sys\nwith fsio.exclusive(sys.argv[1], 'x'):\n"
                               "    print('held', flush=True); time.sleep(60)", str(out / ".lock")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert "another run" in error_of(capsys, "--out_dir", str(out), "--checkpoint", str(tmp_path / "m.pt"))
    holder.kill()
    holder.wait()
    assert main.main([*TINY, "--out_dir", str(out), "--checkpoint", str(tmp_path / "m.pt")]) == 0
    assert not (out / ".lock").exists() and not (tmp_path / "m.pt.lock").exists()


def test_every_checkpoint_records_its_provenance(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main([*TINY, "--name", "p"]) == 0
    saved = load_checkpoint("runs/lm/p/model.pt", "")
    prov = saved["provenance"]
    assert prov["version"] == runs.version() != "" and prov["torch"] == torch.__version__
    assert prov["command"] == "main.py " + " ".join([*TINY, "--name", "p"])
    assert prov["data"]["source"] == "built-in" and prov["data"]["files"].endswith("train.txt and 2 more files")
    assert prov["data"]["bytes"] > 1e6 and len(prov["data"]["key"]) == 16  # names, sizes, times: see shards.py
    text = tmp_path / "t.txt"
    text.write_text("新华社北京一月一日电。今天天气很好，我们一起去公园散步吧！\n" * 8, encoding="utf-8")
    capsys.readouterr()
    assert main.main(["--eval", "--task", "lm", "--input", str(text)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["provenance"] == prov
    with pytest.raises(SystemExit) as done:
        main.main(["--version"])
    expect = f"moe-toolkit {runs.version()}, torch {torch.__version__}"
    assert done.value.code == 0 and capsys.readouterr().out.strip() == expect


def test_a_run_that_stops_before_writing_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    err = error_of(capsys, "--data", "empty.txt")  # refused by the data loader, after the run folder was locked
    assert "empty.txt" in err
    assert os.listdir("runs/lm") == []


def test_a_split_is_hashed_a_chunk_at_a_time_to_the_same_digest_as_whole():
    import hashlib
    import pandas as pd
    df = pd.DataFrame({"text": [f"文本{i}，\"引号\"" for i in range(1234)], "label": ["a", "b"] * 617})
    for split in (df, df[:0], [f"第{i}行" for i in range(1234)], []):
        whole = split.to_csv(index=False) if isinstance(split, pd.DataFrame) else "\n".join(map(str, split))
        assert runs.rows_digest(split, chunk=100) == hashlib.sha256(whole.encode()).hexdigest()
