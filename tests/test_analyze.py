"""--analyze: routing statistics of a trained MoE, on the session's tiny checkpoints."""
import json
import os

import numpy as np
import pytest
import torch

from analyze import Recorder, token_kind
from moe import MoE
from test_lm import tiny_lm
from test_cli import run_main


def analyze(*flags) -> dict:
    return json.loads(run_main("--analyze", *flags).stdout.strip().splitlines()[-1])


def check_layer(layer: dict, tokens: int, num_experts: int = 4, top_k: int = 2):
    assert layer["tokens"] == tokens
    assert sum(v["tokens"] for v in layer["by_kind"].values()) == tokens
    assert sum(layer["load_share"]) == pytest.approx(1, abs=1e-3) and len(layer["load_share"]) == num_experts
    for v in layer["by_kind"].values():  # the fraction of the kind's tokens each expert computed: top_k in all
        assert sum(v["share"]) == pytest.approx(top_k, abs=1e-3) and max(v["share"]) <= 1
    assert 0 <= layer["entropy"] <= layer["entropy_max"] + 1e-6
    share = np.asarray(layer["load_share"])  # the load's coefficient of variation, from the shares
    assert layer["load_cv"] == pytest.approx(share.std() / share.mean(), abs=2e-3)
    # each token has top_k = 2 experts, so exactly one pair: the pair shares over all pairs sum to 1
    assert 0 < sum(p["share_of_tokens"] for p in layer["top_pairs"]) <= 1 + 1e-6


def test_token_kinds():
    assert [token_kind(p) for p in ("中国", "，", "2019", " the", "\ufffd", "", " ", "ω")] == [
        "CJK", "punctuation", "digit", "Latin", "byte fragment", "special", "other", "other"]


@torch.no_grad()
def test_the_recorder_sees_the_routing_each_layer_computed():
    model = tiny_lm()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    inputs = []  # what the first MoE layer received, to route again by hand
    hook = layers[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    recorder = Recorder(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model(ids)
    calls = recorder.take()
    recorder.close()
    hook.remove()
    assert len(calls) == len(layers) and all(m.tap is None for m in layers)
    name, probs, chosen, rows, shape = calls[0]
    again = layers[0].assign(inputs[0].reshape(-1, inputs[0].size(-1)))
    assert shape == (2, 9) and rows.tolist() == list(range(18))
    torch.testing.assert_close(probs, again.probs)
    assert (chosen.sum(1) == model.config.top_k).all()
    assert torch.equal(chosen.bool(), again.per_token(torch.ones_like(again.weight)).bool())
    model(ids)  # closed: nothing more is recorded
    assert recorder.take() == []


def test_analyze_lm_counts_every_token_of_the_input(trained_lm, tmp_path):
    ckpt = trained_lm[0]
    lines = ["新华社北京一月一日电。", "1998年，我们的经济增长了8%。", "Hello world"]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    out = analyze("--checkpoint", ckpt, "--input", str(path), "--out_dir", str(tmp_path / "a"))
    from checkpoint import load_trained
    _, tokenizer, saved = load_trained(ckpt, "lm", "", "cpu")
    tokens = sum(len(tokenizer.encode(l)) + 1 for l in lines)  # + the <eos> before each paragraph
    assert out["model_task"] == "lm" and out["texts"] == 3
    assert len(out["layers"]) == saved["model_config"]["num_layers"]  # tiny preset: every layer is MoE
    for layer in out["layers"]:
        check_layer(layer, tokens)
        assert {"CJK", "punctuation", "digit", "Latin", "special"} <= set(layer["by_kind"])
        assert layer["by_kind"]["special"]["tokens"] == 3
    for key in ("by_kind_png", "cooccurrence_png", "load_png"):
        with open(out[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "by_class_png" not in out


def test_analyze_classifier_by_class_on_its_test_split(trained_cls, tmp_path):
    out = analyze("--checkpoint", trained_cls[0], "--out_dir", str(tmp_path))  # task read from the file
    assert out["model_task"] == "cls" and out["texts"] == 1000
    for layer in out["layers"]:
        assert set(layer["by_class"]) == {"negative", "positive"}
        assert all(sum(row) == pytest.approx(2, abs=1e-3) for row in layer["by_class"].values())  # top_k each
        assert layer["by_kind"]["special"]["tokens"] == 2 * 1000  # [CLS] and [SEP] of each text
        assert layer["by_kind"]["CJK"]["tokens"] > 10_000
    assert os.path.getsize(out["by_class_png"]) > 10_000


def test_analyze_seq2seq_both_stacks_and_refusals(trained_s2s, trained_lm, tmp_path):
    path = tmp_path / "src.txt"
    path.write_text("wo ai bei jing\nni hao\n", encoding="utf-8")
    out = analyze("--checkpoint", trained_s2s[0], "--input", str(path), "--out_dir", str(tmp_path))
    names = [layer["layer"] for layer in out["layers"]]
    assert any(n.startswith("encoder") for n in names) and any(n.startswith("decoder") for n in names)
    enc = next(layer for layer in out["layers"] if layer["layer"].startswith("encoder"))
    assert set(enc["by_kind"]) <= {"Latin", "other", "special"}  # pinyin sources
    bad = run_main("--analyze", "--task", "seq2seq", "--checkpoint", trained_lm[0], check=False)
    assert bad.returncode == 2 and "not a 'seq2seq' one" in bad.stderr and "Traceback" not in bad.stderr


def test_expert_choice_classifier_trains_evenly_loaded(tmp_path):
    """routing=expert through main.py: every logged expert load is exactly 1/E, the tokens no expert took are
    logged, --analyze sees the same loads, and the ONNX export (a data-dependent top-k over the batch) is refused
    in one line."""
    ckpt, out = str(tmp_path / "ec.pt"), str(tmp_path / "run")
    run_main("--train", "--task", "cls", "--preset", "tiny", "--set", "routing=expert", "--set", "top_k=1",
             "--max_steps", "30", "--checkpoint", ckpt, "--out_dir", out)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [row for row in map(json.loads, f) if row.get("expert_load")]
    loads = [row["expert_load"] for row in rows]
    assert loads and all(share == pytest.approx(0.25) for row in loads for layer in row for share in layer)
    # the tokens no expert took are logged (a token may get 0..E experts; with top_k 1 the E experts have N slots)
    batch_tokens = 32 * 64  # the tiny preset's batch rows x context: never every token of a batch
    assert any(row["dropped"] > 0 for row in rows) and max(row["dropped"] for row in rows) < batch_tokens
    result = analyze("--checkpoint", ckpt, "--out_dir", out)
    assert all(s == pytest.approx(0.25, abs=1e-3) for layer in result["layers"] for s in layer["load_share"])
    bad = run_main("--export", "onnx", "--checkpoint", ckpt, check=False)
    assert bad.returncode == 2 and "routing='expert'" in bad.stderr
