import os
import random

import regex
import pytest
from collections import Counter

from data import people_daily_paragraphs
from tokenizer import (PATTERNS, SPLIT_PATTERN, BPETokenizer, CharTokenizer, Tokenizer, merge_chunk, render_token,
                       even_sample, tokenizer_from_dict, train_bpe, train_bpe_fast)

CASES = ["", "我", "我爱编程", "今天天气很好！😀👍", "Hello 世界, GPT-4 与 MoE 模型 2024 年",
         "<|pad|><|bos|> 特殊 <|mask|>", "  多 空格\n换行\t制表 ", "é ü ß ñ", "\x00\x01"]


@pytest.fixture(scope="module")
def corpus():
    return people_daily_paragraphs()[:400]


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPETokenizer.train(corpus, 700)


@pytest.mark.parametrize("text", CASES)
def test_bpe_roundtrip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", CASES)
def test_char_roundtrip_on_seen_chars(corpus, text):
    tok = CharTokenizer.train(corpus + CASES)
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_maps_to_unk(corpus):
    tok = CharTokenizer.train(corpus)
    ids = tok.encode("我🦄")
    assert ids[1] == tok.special_tokens["<|unk|>"]


def test_special_token_text_is_ordinary_text(bpe):
    ids = bpe.encode("<|pad|>")
    assert bpe.pad_id not in ids and len(ids) > 1
    assert set(bpe.special_tokens.values()).isdisjoint(bpe.encode("<|bos|><|eos|><|mask|>"))


def test_bpe_compresses_chinese(bpe, corpus):
    text = "".join(corpus[-50:])
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2  # CJK is 3 bytes a character
    assert bpe.n_vocab == 700


def naive_bpe(texts, num_merges):
    """Reference trainer: recount every pair after every merge (quadratic, fine for a few hundred lines)."""
    chunks = Counter()
    for t in texts:
        chunks.update(regex.findall(SPLIT_PATTERN, t))
    words, freqs = [list(c.encode()) for c in chunks], list(chunks.values())
    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < num_merges:
        counts = Counter()
        for w, f in zip(words, freqs):
            for p in zip(w, w[1:]):
                counts[p] += f
        counts = {p: c for p, c in counts.items() if token_bytes[p[0]] + token_bytes[p[1]] not in token_bytes}
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        merges.append(best)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        words = [merge_chunk(w, best, len(token_bytes) - 1, Counter(), 1) for w in words]
    return merges


def test_incremental_training_equals_naive_recount(corpus):
    texts = corpus[:60]
    assert train_bpe(texts, 256 + 5 + 150) == naive_bpe(texts, 150)


def test_merge_chunk_known_answer():
    deltas = Counter()
    assert merge_chunk([1, 2, 3, 1, 2], (1, 2), 9, deltas, 1) == [9, 3, 9]
    assert {k: v for k, v in deltas.items() if v} == {(2, 3): -1, (9, 3): 1, (3, 1): -1, (3, 9): 1}
    assert merge_chunk([5, 5, 5], (5, 5), 7, Counter(), 1) == [7, 5]


def test_known_answer_merges():
    # chunks "aaab" and " aaab" x2: (a, a) counts 6 (twice per chunk); after it each chunk is [aa, a, b] and
    # (a, b) ties (aa, a) at 3: the smaller pair wins; then (aa, ab) 3, (" ", aaab) 2; nothing repeats after
    assert train_bpe(["aaab aaab aaab"], 256 + 5 + 10) == [(97, 97), (97, 98), (256, 257), (32, 258)]
    # chunks "ab", " ab", " cd" x3: (" ", c) and (c, d) tie at 3 -> (32, 99) first, then (" c", d) 3, (a, b) 2;
    # (" ", a) is seen once and is never merged
    assert train_bpe(["ab ab cd cd cd"], 256 + 5 + 10) == [(32, 99), (256, 100), (97, 98)]
    assert train_bpe(["aaab aaab aaab"], 256 + 5 + 2) == [(97, 97), (97, 98)]  # the vocabulary size caps merges


# mixed scripts the split pattern treats differently: Han runs, Latin with contractions, digit runs, emoji with
# a skin-tone modifier, Arabic-Indic digits, a Roman numeral, full-width space, CR/LF/tab runs, punctuation
MIXED = [*"我爱编程今天天气，。！？ abcXYZ 0123456789\n\r\t", "'s", "'ll", "'S", "'ve", "😀", "👍🏽", "é", "ß", "١٢",
         "Ⅻ", "\u3000", "’", "<|pad|>", "  "]


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_the_fast_trainer_splits_text_where_tiktoken_does(corpus, kind):
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(PATTERNS[kind]), behavior="isolated")
    tok = BPETokenizer.train(corpus[:200], 600, kind=kind)
    rnd = random.Random(0)
    for _ in range(1500):
        text = "".join(rnd.choice(MIXED) for _ in range(rnd.randint(0, 30)))
        pieces = [piece for piece, _ in split.pre_tokenize_str(text)]
        assert pieces == regex.findall(PATTERNS[kind], text), text  # the reference trainer's chunks
        # tiktoken cuts at the same places: the text's tokens are its pieces' tokens, one after another
        assert tok.encode(text) == [i for piece in pieces for i in tok.encode(piece)], text


def test_every_rank_is_reachable(bpe):
    # each token's bytes, encoded alone, give that token: no rank is shadowed by another way to make its bytes
    assert [bpe.enc._encode_bytes(bpe.vocab[i]) for i in range(len(bpe.vocab))] == [[i] for i in range(len(bpe.vocab))]
    assert sorted(bpe.vocab) == list(range(len(bpe.vocab)))


def test_the_fast_trainer_compresses_as_the_reference_does():
    paragraphs = people_daily_paragraphs()
    train, held_out = paragraphs[:2000], "\n".join(paragraphs[2000:2400])
    fast, reference = train_bpe_fast(train, 2000), train_bpe(train, 2000)
    assert len(fast) == len(reference) == 2000 - 256 - 5
    assert len(set(fast) & set(reference)) > 0.97 * len(reference)  # ties may break differently, little else
    tokens = [len(BPETokenizer(m).encode(held_out)) for m in (fast, reference)]
    assert abs(tokens[0] - tokens[1]) < 0.01 * tokens[1]


def test_fast_known_answer_merges():
    # the reference's known answers where no tie decides (see test_known_answer_merges)
    assert train_bpe_fast(["aaab aaab aaab"], 256 + 5 + 10) == [(97, 97), (97, 98), (256, 257), (32, 258)]
    assert train_bpe_fast(["aaab aaab aaab"], 256 + 5 + 2) == [(97, 97), (97, 98)]
    assert sorted(train_bpe_fast(["ab ab cd cd cd"], 256 + 5 + 10)) == [(32, 256), (97, 98), (99, 100)]


def test_even_sample_spans_the_corpus():
    texts = [f"{i:04d}" * 25 for i in range(1000)]  # 100 bytes each: 0.1 MB
    assert even_sample(texts, 0) is texts and even_sample(texts, 1) is texts  # 0: all; a corpus that fits: all
    assert even_sample(texts, 0.01) == texts[::10]  # every 10th, first to last
    assert len(even_sample(texts, 0.003)) == 30  # every 34th (0.1 MB / 0.003 MB, rounded up): at most 3,000 bytes


def test_save_load_and_readable_vocab(bpe, tmp_path):
    path = str(tmp_path / "tok.json")
    bpe.save(path)
    loaded = Tokenizer.load(path)
    for text in CASES:
        assert loaded.encode(text) == bpe.encode(text)
    vocab = (tmp_path / "tok.vocab").read_text(encoding="utf-8")
    assert "中国" in vocab or "人民" in vocab  # merged Chinese tokens show as characters, not byte soup
    assert "<|pad|>" in vocab
    other = {**bpe.to_dict(), "pat_str": r"\S+"}  # a tokenizer saved with another split would encode differently
    with pytest.raises(ValueError, match="another split pattern"):
        tokenizer_from_dict(other)


def test_render_token():
    assert render_token("中".encode()) == "中"
    assert render_token("中".encode()[:2]) == "\\xe4\\xb8"


def test_pad_batch_truncates_and_masks(bpe):
    ids, mask = bpe.pad_batch([[5, 6, 7, 8, 9], [5]], max_len=4)
    assert ids[0] == [bpe.bos_id, 5, 6, bpe.eos_id]
    assert ids[1] == [bpe.bos_id, 5, bpe.eos_id, bpe.pad_id]
    assert mask == [[1, 1, 1, 1], [1, 1, 1, 0]]



def test_a_second_data_run_reuses_the_tokenizer_trained_on_the_same_file(corpus, tmp_path, monkeypatch):
    import data
    import main
    import tokenizer
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DATASET_DIR", str(tmp_path / "dataset"))
    trained, train = [], tokenizer.train_tokenizer
    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a, **k: trained.append(a[0]) or train(*a, **k))
    (tmp_path / "news.txt").write_text("\n".join(corpus[:200]), encoding="utf-8")
    run = ["--train", "--task", "lm", "--preset", "tiny", "--data", "news.txt", "--max_steps", "1", "--quiet"]
    assert main.main(run) == 0 and main.main(run) == 0
    assert len(trained) == 1  # the second run read the cached one
    assert len(os.listdir(tmp_path / "dataset" / "tokenizers")) == 2  # the tokenizer and its .vocab
    (tmp_path / "news.txt").write_text("\n".join(corpus[:199]), encoding="utf-8")
    assert main.main(run) == 0 and len(trained) == 2  # an edited file trains its own
    assert len(os.listdir(tmp_path / "dataset" / "tokenizers")) == 4  # two tokenizers, each with its .vocab
    assert data.tokenizer_cache(None, "bpe", 300, corpus[:50]) != data.tokenizer_cache(None, "bpe", 512, corpus[:50])


def test_packed_windows_hold_the_same_sequences_as_lists(bpe, corpus):
    from data import Packed, encode_texts, windows
    as_lists = windows(encode_texts(bpe, corpus), 20)
    packed = Packed.windows_of(bpe, corpus, 20, chunk=7)  # chunks that split the texts unevenly
    assert len(packed) == len(as_lists) > len(corpus)
    assert [packed[i] for i in range(len(packed))] == as_lists == list(packed)
    assert packed.ids.dtype.itemsize == 4 and len(Packed([])) == 0
