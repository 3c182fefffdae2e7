"""The seq2seq task: pinyin pairs, encoder-decoder decoding (cache, beam, gradient checkpointing), and main.py
end to end on the tiny preset."""
import json
import os

import pandas as pd
import pytest
import torch

import data
import main
import pinyin
import task_s2s
from checkpoint import load_checkpoint, load_trained
from config import Seq2SeqConfig
from models import Seq2Seq
from task_s2s import edit_distance, score
from test_cli import run_main
from tracking import MetricsLog

# written for these tests: short everyday and news-style sentences
SENTENCES = """我爱编程。今天天气很好。我们一起去公园散步吧！他在北京大学读书。这本书非常有意思。
明天上午九点开会。请把窗户打开。中国人民银行发布了新的政策。经济发展速度加快。学生们在操场上跑步。
春节快到了，大家都很高兴。她喜欢唱歌和跳舞。医生建议他多喝水。这个城市的交通很方便。
我们要保护环境。老师正在给学生上课。火车站离这里不远。他每天早上六点起床。新年的钟声敲响了。
工厂的产量提高了一倍。农民今年获得了好收成。电脑已经走进了千家万户。孩子们在院子里玩耍。
会议讨论了明年的工作计划。科学技术是第一生产力。我想去上海看看。这家饭店的菜很好吃。
你明天有时间吗？运动员们取得了优异的成绩。政府加大了对教育的投入。他们正在修建一座新桥。
我们的生活越来越好。图书馆里有很多人在看书。天气预报说今天有雨。妈妈做的饭最香。
记者采访了当地的居民。市场上的水果很新鲜。全国各地都在庆祝节日。他把钥匙忘在家里了。
这条河的水很清。我们应该互相帮助。公司决定招聘新的员工。人民群众的生活水平不断提高。""".split()


def sentences():
    return [s for line in SENTENCES for s in data.split_sentences(line, min_chars=3)]


# -----------------------------------------------------------------------------
# Data and metrics

@pytest.mark.parametrize("argv,batch", [([], 64), (["--time_budget", "75"], 32), (["--time_budget", "300"], 64),
                                        (["--time_budget", "75", "--batch_size", "16"], 16)])
def test_short_budgets_train_at_batch_32(argv, batch):
    """The preset's budget rule: below 100 s, batch 32 (measured best at 75 s for the MoE and its twin)."""
    args = main.build_parser().parse_args(["--train", "--task", "seq2seq", *argv])
    _, _, train_cfg = main.resolve_config("seq2seq", args.preset, main.config_flags(args), args.set)
    assert train_cfg.batch_size == batch


def test_pinyin_and_sentence_splitting():
    assert pinyin.to_pinyin("我爱编程") == "wo ai bian cheng"
    assert pinyin.to_pinyin("重庆的行长说：好！") == "chong qing de hang zhang shuo ： hao ！"
    assert data.split_sentences("他说：“走吧。”好的！短。这句话没有句号") == ["他说：“走吧。”", "这句话没有句号"]


@pytest.mark.parametrize("typed,sources", [
    ("wo ai bian cheng", ["wo ai bian cheng 。"]),               # the sources all end in a sentence mark
    ("woaibiancheng", ["wo ai bian cheng 。"]),                  # syllables typed together
    ("Wo  Ai BIAN cheng", ["wo ai bian cheng 。"]),              # case and spacing
    ("wo ai bian cheng.", ["wo ai bian cheng 。"]),              # an ASCII mark means the Chinese one
    ("ni hao, shi jie!", ["ni hao ， shi jie ！"]),
    ("nü ren", ["nv ren 。"]), ("lu:se", ["lv se 。"]),           # ü as v, as pypinyin writes it
    ("xi'an", ["xi an 。"]), ("xian", ["xian 。"]),              # the apostrophe separates syllables
    ("fangan", ["fang an 。", "fan gan 。"]),                    # two splits: the model's score decides
    ("mai 3.5 jin iPhone", ["mai 3.5 jin iphone 。"]),          # digits and Latin words are kept
    ("zhongguorenmin", ["zhong guo ren min 。"]),
])
def test_typed_pinyin_becomes_the_training_source_form(typed, sources):
    assert pinyin.pinyin_sources(typed) == sources
    assert pinyin.split_syllables("qwrtz") == []


def test_builtin_pinyin_pairs_follow_the_paragraph_split():
    splits = data.pinyin_splits(quiet=True)
    assert len(splits["train"]) > 30_000 and len(splits["val"]) > 1_000 and len(splits["test"]) > 1_000
    # split by paragraph: a test sentence is in train only when the newspaper repeated it word for word
    repeated = set(splits["train"].target) & set(splits["test"].target)
    assert len(repeated) < 0.02 * len(splits["test"])
    row = splits["test"].iloc[0]
    assert 4 <= len(row.target) <= 64 and row.source.split()[0].isascii()
    assert pinyin.to_pinyin(row.target) == row.source


def test_lexicon_pairs_are_jieba_words_read_by_pypinyin():
    words, counts = pinyin.jieba_words()
    assert len(words) > 300_000 and "编程" in words and all(2 <= len(w) <= 4 for w in words[:1000])
    lexicon = pinyin.lexicon_pairs(6_000)  # 6,000 rows hold more draws than the ~31k words counted >= 100 times
    drawn = [w for t in lexicon.target for w in t[:-1].split("，")]
    assert set(lexicon.target.str[-1]) == {"。"} and set(lexicon.source.str[-2:]) == {" 。"}
    assert {len(t[:-1].split("，")) for t in lexicon.target} == set(range(4, 9))
    for source, target in zip(lexicon.source[:50], lexicon.target[:50]):  # pronunciations from pypinyin, per word
        assert source == " ， ".join(pinyin.to_pinyin(w) for w in target[:-1].split("，")) + " 。"
    frequent = {w for w, c in zip(words, counts) if c >= 100}
    assert frequent <= set(drawn)  # every word counted >= 100 times at least once
    by_count = pinyin.lexicon_pairs(300, min_count=10 ** 9)  # no "once" words: all draws by count ** 0.75
    count = dict(zip(words, counts))
    drawn = [count[w] for t in by_count.target for w in t[:-1].split("，")]
    assert sorted(drawn)[len(drawn) // 2] > 10 * sorted(counts)[len(counts) // 2]  # median drawn >> median word


def test_lexicon_pairs_join_the_training_split_only():
    from task_s2s import load_splits
    plain, mixed = load_splits(None, 1337, True), load_splits(None, 1337, True, lexicon=40)
    assert len(mixed["train"]) == len(plain["train"]) + 40
    assert mixed["train"].iloc[-40:].target.str.contains("，").all()
    for split in ("val", "test"):
        assert mixed[split].equals(plain[split])


def test_review_sentences_are_an_unseen_pinyin_test_set():
    reviews = data.review_pinyin_test(quiet=True)
    assert len(reviews) == 1000 and reviews.target.is_unique
    assert all(t[-1] in data.SENTENCE_END and data.HAN_SENTENCE.fullmatch(t) for t in reviews.target)
    assert all(pinyin.to_pinyin(t) == s for s, t in zip(reviews.source[:50], reviews.target[:50]))
    texts = "\n".join(data.reviews_splits(quiet=True)["test"].text)
    assert all(t in texts for t in reviews.target[:50])  # from the review corpus's test split
    assert not set(reviews.target) & set(data.pinyin_splits(quiet=True)["train"].target)


def test_everyday_phrases_are_spelled_as_pypinyin_reads_them():
    phrases = data.pair_frame(os.path.join(os.path.dirname(__file__), "everyday_pinyin.tsv"))
    assert len(phrases) >= 30 and "我爱编程" in set(phrases.target)
    for source, target in zip(phrases.source, phrases.target):  # hand-written, checked against pypinyin
        assert pinyin.to_pinyin(target) == source and pinyin.pinyin_sources(source) == [source + " 。"]


def test_word_prior_prefers_words_and_reranks_the_beam():
    from task_s2s import rerank, word_prior_for
    assert pinyin.word_logprob("我爱编程") > pinyin.word_logprob("我爱便城") and pinyin.word_logprob("") == 0.0
    assert pinyin.word_logprob("早上好") > pinyin.word_logprob("早上号")
    hyps = [(-0.6, "早上好"), (-0.5, "早上号")]  # the model slightly prefers the non-word
    assert [t for _, t in rerank(hyps, 0.0)] == ["早上号", "早上好"]
    best = rerank(hyps, 0.3)
    assert best[0][1] == "早上好" and best[0][0] == pytest.approx(-0.6 + 0.3 * pinyin.word_logprob("早上好") / 3)
    assert word_prior_for({"source": "pinyin"}, None) > 0 and word_prior_for({}, None) == 0.0
    assert word_prior_for({"source": "pinyin"}, 0.0) == 0.0


def test_edit_distance_and_scores():
    assert edit_distance("我爱编程", "我爱编程") == 0
    assert edit_distance("我爱变成", "我爱编程") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("abcd", "abc") == 1
    s = score(["我爱编程", "你好"], ["我爱编程", "你们好"])
    assert s["exact_match"] == 0.5 and s["char_acc"] == pytest.approx(1 - 1 / 7)


@pytest.mark.parametrize("content, message", [
    ("text\tlabel\nni hao\t你好\n", "need columns source and target"),
    ("", "file is empty"),
    ("source\ttarget\nni hao\t你好\nwo\t\n", "row 2 has an empty 'target'"),
])
def test_bad_pair_files_fail_with_one_line(tmp_path, content, message):
    path = tmp_path / "pairs.tsv"
    path.write_text(content, encoding="utf-8")
    proc = run_main("--train", "--task", "seq2seq", "--preset", "tiny", "--data", str(path), "--checkpoint",
                    str(tmp_path / "m.pt"), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "m.pt")


def test_question_answer_columns_are_accepted(tmp_path):
    path = tmp_path / "qa.jsonl"
    pd.DataFrame({"question": ["你好吗"] * 20, "answer": ["我很好"] * 20}).to_json(path, orient="records",
                                                                                  lines=True, force_ascii=False)
    splits = data.user_pair_splits(str(path), seed=1)
    assert list(splits["train"].columns) == ["source", "target"] and len(splits["train"]) == 18


# -----------------------------------------------------------------------------
# Model and decoding

def tiny_s2s(**kw):
    base = dict(vocab_size=40, max_len=16, d_model=32, n_heads=2, num_layers=2, d_ff=16, num_experts=4, top_k=2,
                dropout=0.0, moe_layers="odd")
    base.update(kw)
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(**base))
    with torch.no_grad():  # larger weights than at init, so decoding paths differ between sources
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def source_batch():
    src = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(src)
    mask[1, 6:] = 0  # one padded source
    return src, mask


@pytest.mark.parametrize("rope", [False, True])
def test_cached_decoder_equals_full_decoder(rope):
    model = tiny_s2s(rope=rope)
    src, mask = source_batch()
    tgt = torch.randint(5, 40, (3, 12))
    with torch.no_grad():
        memory, _ = model.encode(src, mask)
        full, _ = model.decode(tgt, memory, mask)
        caches = [{} for _ in model.decoder]
        steps = [model.decode(tgt[:, t:t + 1], memory, mask, caches=caches)[0] for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_cached_and_uncached_greedy_agree_and_beam_1_is_greedy(rope):
    model = tiny_s2s(rope=rope)
    src, mask = source_batch()
    cached = model.greedy(src, mask, bos_id=1, eos_id=2, max_new_tokens=15)
    uncached = model.greedy(src, mask, bos_id=1, eos_id=2, max_new_tokens=15, use_cache=False)
    assert cached == uncached and len(set(map(tuple, cached))) > 1
    assert model.beam_search(src, mask, 1, 2, 15, beam_size=1) == cached


def test_beam_search_scores_at_least_as_well_as_greedy():
    model = tiny_s2s()
    src, mask = source_batch()
    decode, eos_bias = model.decode, torch.zeros(40)
    eos_bias[2] = 2.0  # an untrained model seldom ends: make <eos> likely enough that hypotheses finish
    model.decode = lambda *a, **k: (lambda out: (out[0] + eos_bias, out[1]))(decode(*a, **k))

    @torch.no_grad()
    def logprob(i, seq):  # summed log-probability of seq + eos for source i
        dec_in = torch.tensor([[1] + seq])
        logits, _, _ = model(src[i:i + 1], mask[i:i + 1], dec_in)
        return float(logits.log_softmax(-1)[0, torch.arange(len(seq) + 1), torch.tensor(seq + [2])].sum())

    greedy = model.greedy(src, mask, 1, 2, 15)
    hyps = model.beam_hypotheses(src, mask, 1, 2, 15, beam_size=4, length_penalty=0.0)
    finished = [i for i in range(3) if len(greedy[i]) < 15]
    assert len(finished) >= 2 and any(hyps[i][0][1] != greedy[i] for i in finished)
    for i in finished:
        assert hyps[i][0][0] >= logprob(i, greedy[i]) - 1e-4
        for reported, seq in hyps[i]:  # the reported scores are the hypotheses' summed log-probabilities
            assert reported == pytest.approx(logprob(i, seq), abs=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_s2s(dropout=0.1, moe_layers="all").train()
        model.grad_checkpoint = ckpt
        src, mask = source_batch()
        tgt = torch.randint(5, 40, (3, 10))
        torch.manual_seed(1)  # same dropout masks and router noise
        _, loss, _ = model(src, mask, tgt, labels=tgt)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# main.py end to end

def test_training_lowers_the_loss_and_writes_everything(trained_s2s):
    ckpt, out, summary = trained_s2s
    rows = MetricsLog.read(os.path.join(out, "metrics.jsonl"))
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0] - 1.0
    for png in ("loss_curve.png", "expert_heatmap.png"):
        assert os.path.getsize(os.path.join(out, png)) > 10_000
    assert {"test_char_acc", "test_exact_match", "val_char_acc"} <= set(summary)
    preds = pd.read_csv(os.path.join(out, "test_predictions.csv"))
    assert list(preds.columns) == ["source", "target", "pred"]


def test_checkpoint_round_trip(trained_s2s, pairs_file):
    ckpt, out, summary = trained_s2s
    model, tokenizer, saved = load_trained(ckpt, "seq2seq", "", torch.device("cpu"))
    from task_s2s import Pairs, evaluate
    test = data.user_pair_splits(pairs_file, seed=saved["train_config"]["seed"])["test"]
    res = evaluate(model, tokenizer, Pairs(tokenizer, test, model.config.max_len), torch.device("cpu"), "fp32",
                   decode=0, prefix="test")
    assert res["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert res["test_char_acc"] == pytest.approx(summary["test_char_acc"])


def test_infer_and_classify_through_main(trained_s2s, pairs_file, tmp_path):
    ckpt, out, _ = trained_s2s
    proc = run_main("--infer", "--task", "seq2seq", "--checkpoint", ckpt, "--text", "wo ai bian cheng", "--json")
    result = json.loads(proc.stdout)
    from task_s2s import convert, source_ids
    model, tokenizer, _ = load_trained(ckpt, "seq2seq", "", torch.device("cpu"))

    def direct(sources, beam=4):  # what the model says without main.py in between
        return convert(model, tokenizer, source_ids(tokenizer, sources, model.config.max_len), torch.device("cpu"),
                       beam=beam)
    assert result["source"] == "wo ai bian cheng" and result["pred"] == direct(["wo ai bian cheng"])[0] != ""
    beam = json.loads(run_main("--infer", "--task", "seq2seq", "--checkpoint", ckpt, "--text", "wo ai bian cheng",
                               "--json", "--beam", "3").stdout)
    assert beam["beam"] == 3 and beam["truncated"] is False
    long = run_main("--infer", "--task", "seq2seq", "--checkpoint", ckpt, "--text", "wo ai bian cheng " * 40,
                    "--json")
    assert json.loads(long.stdout)["truncated"] is True and "only the first 48 are converted" in long.stderr

    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [1, 2], "source": ["wo ai bian cheng", "jin tian tian qi hen hao 。"],
                  "target": ["我爱编程", "今天天气很好。"]}).to_csv(src, index=False)
    dst = tmp_path / "preds.csv"
    proc = run_main("--classify", "--task", "seq2seq", "--checkpoint", ckpt, "--input", str(src), "--output",
                    str(dst))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out_df = pd.read_csv(dst)
    assert list(out_df.columns) == ["id", "source", "target", "pred"] and result["rows"] == 2
    assert list(out_df.pred.fillna("")) == direct(["wo ai bian cheng", "jin tian tian qi hen hao 。"])
    expected = score(list(out_df.pred.fillna("")), ["我爱编程", "今天天气很好。"])
    assert (result["char_acc"], result["exact_match"]) == pytest.approx((expected["char_acc"], expected["exact_match"]))


def test_pinyin_input_is_normalised_and_candidates_are_ranked(trained_s2s, tmp_path, capsys):
    ckpt, _, _ = trained_s2s
    state = load_checkpoint(ckpt, "")
    state["source"] = "pinyin"  # what a model trained on the built-in pinyin pairs records
    pinyin_ckpt = str(tmp_path / "pinyin.pt")
    torch.save(state, pinyin_ckpt)

    def infer(text, *extra):  # main.py in this process (a subprocess per call would cost a torch import each)
        assert main.main(["--infer", "--task", "seq2seq", "--checkpoint", pinyin_ckpt, "--text", text, *extra,
                          "--quiet"]) == 0
        return capsys.readouterr().out

    spaced = json.loads(infer("wo ai bian cheng", "--json"))
    assert spaced["source"] == "wo ai bian cheng 。"
    for typed in ("woaibiancheng", "Wo  Ai BIAN cheng", "wo ai bian cheng."):
        same = json.loads(infer(typed, "--json"))
        mark = "。" if typed.endswith(".") else ""  # a mark the user typed is written; one added for the model is not
        assert (same["source"], same["pred"]) == (spaced["source"], spaced["pred"] + mark)
    many = json.loads(infer("wo ai bian cheng", "--json", "--num_candidates", "3"))
    scores = [c["score"] for c in many["candidates"]]
    model, tokenizer, saved = load_trained(pinyin_ckpt, "seq2seq", "", torch.device("cpu"))
    found = task_s2s.ranked(model, tokenizer, saved, "wo ai bian cheng", torch.device("cpu"), 4, 1.0, 3,
                            task_s2s.WORD_PRIOR, task_s2s.FUSION)[0]  # the distinct conversions of the beam
    assert len(scores) == min(3, len(found)) and scores == sorted(scores, reverse=True)  # as many as asked for
    assert len({c["text"] for c in many["candidates"]}) == len(scores) and many["pred"] == many["candidates"][0]["text"]
    wordy = json.loads(infer("wo ai bian cheng", "--json", "--num_candidates", "4", "--word_prior", "100"))
    per_char = [pinyin.word_logprob(c["text"]) / max(len(c["text"]), 1) for c in wordy["candidates"]]
    assert per_char[0] == max(per_char)  # a heavy word prior ranks the most word-like conversion first
    listed = infer("wo ai bian cheng", "--num_candidates", "2").strip().splitlines()
    assert [line[:3] for line in listed] == [f"{i}. " for i in range(1, min(2, len(found)) + 1)]


def test_infer_without_checkpoint_says_how_to_train(tmp_path):
    proc = run_main("--infer", "--task", "seq2seq", "--checkpoint", str(tmp_path / "none.pt"), "--text", "ni hao",
                    check=False)
    assert proc.returncode == 2 and "python main.py --train --task seq2seq" in proc.stderr
