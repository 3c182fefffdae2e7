"""The input method on everyday text: the character n-gram model of charlm.py, shallow fusion in the beam
search, and input that is no pinyin kept as typed."""
import json

import numpy as np
import pytest
import torch

import charlm
import data
import main
import pinyin
import task_s2s
from checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def lm():
    return charlm.load()


def test_the_ngram_model_is_a_distribution_and_never_reads_a_held_out_text(lm):
    for history in (charlm.BOS * 2, charlm.BOS + "手", "手机", "没电", "\u9fa5\u9fa4"):  # seen, and never seen
        p = lm.probs(history)
        assert p.sum() == pytest.approx(1.0) and (p > 0).all()
    assert lm.text_logprob("手机没电了") > lm.text_logprob("手机每点了")  # the word list knows 没电
    texts = set(charlm.training_texts())
    reviews = data.reviews_splits(quiet=True)
    assert not texts & (set(reviews["val"].text) | set(reviews["test"].text))
    news = data.news_splits(quiet=True)
    assert not texts & (set(news["val"]) | set(news["test"]))


@pytest.fixture()
def pinyin_ckpt(trained_s2s, tmp_path):
    state = load_checkpoint(trained_s2s[0], "")
    state["source"] = "pinyin"  # what a model trained on the built-in pinyin pairs records: fusion on by default
    path = str(tmp_path / "pinyin.pt")
    torch.save(state, path)
    return path


def infer(ckpt, capsys, text, *extra):
    assert main.main(["--infer", "--task", "seq2seq", "--checkpoint", ckpt, "--text", text, "--json", *extra,
                      "--quiet"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_fusion_changes_the_beam_toward_the_ngram_model(pinyin_ckpt, capsys, lm):
    args = ("--num_candidates", "4")
    off, _ = infer(pinyin_ckpt, capsys, "wo ai bian cheng", *args, "--fusion", "0", "--word_prior", "0")
    on, _ = infer(pinyin_ckpt, capsys, "wo ai bian cheng", *args, "--fusion", "3", "--word_prior", "0")
    assert [c["score"] for c in off["candidates"]] != [c["score"] for c in on["candidates"]]
    # a heavy weight ranks the n-gram model's favourite of the candidates first
    lm_scores = [lm.text_logprob(c["text"]) for c in on["candidates"]]
    assert lm_scores[0] == max(lm_scores)
    default, _ = infer(pinyin_ckpt, capsys, "wo ai bian cheng", *args, "--word_prior", "0")
    fused, _ = infer(pinyin_ckpt, capsys, "wo ai bian cheng", *args, "--fusion", str(task_s2s.FUSION),
                     "--word_prior", "0")
    assert default["candidates"] == fused["candidates"]  # the default weight for a pinyin model


def test_the_fusion_term_is_the_weighted_ngram_log_probability(trained_s2s, lm):
    from checkpoint import load_trained
    _, tokenizer, _ = load_trained(trained_s2s[0], "seq2seq", "", torch.device("cpu"))
    fusion = charlm.Fusion(lm, tokenizer, 0.5)
    row = fusion(["今天"]).numpy()[0]
    expect = np.log(lm.probs("今天"))
    for t in range(tokenizer.n_vocab):
        s = charlm.symbols(tokenizer.decode([t]))
        if len(s) == 1 and s in lm.index and t != tokenizer.eos_id:
            assert row[t] == pytest.approx(0.5 * expect[lm.index[s]], rel=1e-5)
    assert row[tokenizer.eos_id] == pytest.approx(0.5 * expect[lm.index[charlm.EOS]], rel=1e-5)


def test_what_is_no_pinyin_is_kept_as_typed(pinyin_ckpt, capsys):
    res, err = infer(pinyin_ckpt, capsys, "hello world 123")
    assert res["pred"] == "hello world 123" and res["kept"] == ["hello world 123"]
    assert "not pinyin, kept as typed: hello world 123" in err
    mixed, _ = infer(pinyin_ckpt, capsys, "wo you 3 ge iPhone")
    assert mixed["kept"] == ["3", "iPhone"]
    assert "3" in mixed["pred"] and mixed["pred"].endswith("iPhone") and "you" not in mixed["pred"]
    assert pinyin.pinyin_spans("xi'an he lüse") == [("xi'an he lüse", True)]


def test_every_conversion_reads_as_its_pinyin():
    from pypinyin import Style, pinyin
    from test_seq2seq import sentences
    from tokenizer import BPETokenizer
    # the default preset's kind of vocabulary: one token per Han character (the tiny fixture's 300 tokens spell
    # most characters in bytes, which the rule refuses)
    tokenizer = BPETokenizer.train(sentences(), 700, kind="bpe_hanzi")
    rule = charlm.PinyinConstraint(tokenizer, ["jin tian hen hao 3.5 。", "wo ai bian cheng"], beam=2)
    allowed = lambda rows: [[tokenizer.decode([t]) for t in np.flatnonzero(np.isfinite(r))] for r in rule(rows).numpy()]
    first, other_source = allowed(["", ""])[0], allowed(["", "", ""])[2]
    assert first and all("jin" in pinyin(w, style=Style.NORMAL, heteronym=True)[0] for w in first)
    assert "今" in first and "我" not in first and other_source == ["我"]  # row 2 is the second source's beam
    assert tokenizer.eos_id not in np.flatnonzero(np.isfinite(rule([""]).numpy()[0]))  # no end before the last
    written = "今天很好"
    assert set(allowed([written])[0]) <= {"3", "3.", "3.5"} and "3" in allowed([written])[0]
    assert allowed(["今天很好3.5"])[0] == ["。"]
    assert list(np.flatnonzero(np.isfinite(rule(["今天很好3.5。"]).numpy()[0]))) == [
        tokenizer.eos_id]
