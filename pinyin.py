"""Pinyin as people type it: normalisation (tones, ü, separators), splitting a run of letters into syllables,
which pieces of an input are pinyin at all, and the jieba word prior that reranks conversions."""
from __future__ import annotations

import logging
import re

import jieba
import numpy as np
import pandas as pd
from pypinyin import lazy_pinyin
from pypinyin.contrib.tone_convert import to_normal
from pypinyin.pinyin_dict import pinyin_dict

from fsio import package_text

SENTENCE_END = "。！？；"


ASCII_MARKS = str.maketrans(".,!?;", "。，！？；")


def to_pinyin(sentence: str) -> str:
    """Toneless pinyin, syllables separated by spaces; punctuation, digits and Latin text kept as they are.

    pypinyin resolves polyphones by phrase (重庆 -> chong qing, 行长 -> hang zhang); ü is written v.
    """
    return " ".join(p.strip() for p in lazy_pinyin(sentence) if p.strip())


_SYLLABLES: frozenset = frozenset()


def pinyin_syllables() -> frozenset:
    """Every toneless syllable pypinyin writes (ü as v), read from its character dictionary (about 410)."""
    global _SYLLABLES
    if not _SYLLABLES:
        _SYLLABLES = frozenset(to_normal(p) for readings in pinyin_dict.values() for p in readings.split(","))
    return _SYLLABLES


def split_syllables(run: str, limit: int = 4) -> list[list[str]]:
    """The ways to write a run of letters as pinyin syllables with the fewest syllables (at most `limit`,
    longest first syllable first): "woaibiancheng" -> [[wo, ai, bian, cheng]], "xian" -> [[xian]] (a user
    who means 西安 types xi'an), "fangan" -> [[fang, an], [fan, gan]]. [] when there is no way."""
    syllables, n = pinyin_syllables(), len(run)
    fewest = [n + 1] * n + [0]  # fewest[i]: syllables needed for run[i:] (n + 1: none), filled from the end
    for i in range(n - 1, -1, -1):
        fewest[i] = min((1 + fewest[j] for j in range(i + 1, min(n, i + 6) + 1) if run[i:j] in syllables),
                        default=n + 1)
    if fewest[0] > n:
        return []
    out: list[list[str]] = []

    def walk(i: int, path: list[str]) -> None:
        if len(out) >= limit:
            return
        if i == n:
            out.append(list(path))
            return
        for j in range(min(n, i + 6), i, -1):
            if run[i:j] in syllables and fewest[j] == fewest[i] - 1:
                walk(j, path + [run[i:j]])

    walk(0, [])
    return out


def pinyin_sources(text: str, limit: int = 4) -> list[str]:
    """A user's pinyin in the training sources' form (see open_pinyin_sources), ending in a sentence mark."""
    return close_sentence(open_pinyin_sources(text, limit))[0]


def close_sentence(sources: list[str]) -> tuple[list[str], bool]:
    """(sources, whether a final 。 was added): the training sentences all end in a sentence mark, and without
    one the model tends to add a character. The alternatives of one input share their last piece."""
    if sources[0][-1:] in SENTENCE_END:
        return sources, False
    return [f"{s} 。".strip() for s in sources], True


def open_pinyin_sources(text: str, limit: int = 4) -> list[str]:
    """A user's pinyin in the training sources' form, as typed at its end: lower case, ü as v, syllables and marks
    separated by one space. Runs of letters that are not one syllable are split into syllables; a run with several
    fewest-syllable splits gives one source per split (up to `limit`, for the model to choose by score).
    Runs that are no pinyin at all (Latin words) and everything else are kept as they are."""
    text = text.lower().replace("ü", "v").replace("u:", "v")  # marks stay as typed: the sources keep ，and ！
    choices: list[list[str]] = []
    for piece in re.findall(r"[a-z]+|[^a-z\s']+", text):
        if piece[0].isalpha() and piece.isascii() and piece not in pinyin_syllables():
            choices.append([" ".join(split) for split in split_syllables(piece, limit)] or [piece])
        else:  # a bare ASCII mark means the Chinese one (the sources have 。，！？；), "3.5" stays
            choices.append([piece.translate(ASCII_MARKS) if set(piece) <= set(".,!?;") else piece])
    if not choices:
        return [text.strip()]
    sources = [""]
    for options in choices:  # the alternatives of each run, multiplied out, then capped
        sources = [f"{s} {o}".strip() for s in sources for o in options][:limit]
    return sources


def is_pinyin_word(word: str) -> bool:
    """A run of Latin letters that reads as pinyin syllables ("ni", "woaibiancheng", "xi'an", "lüse")."""
    run = word.lower().replace("ü", "v").replace("u:", "v").replace("'", "")
    if not (run.isascii() and run.isalpha()):
        return False
    return run in pinyin_syllables() or bool(split_syllables(run, 1))


def pinyin_spans(text: str) -> list[tuple[str, bool]]:
    """A user's input cut into (piece, is pinyin) spans: runs of pinyin words with the spaces and marks between
    them, and everything else (Latin words that are no pinyin, numbers) as typed. "wo you 3 ge pingguo" ->
    [("wo you", True), ("3", False), ("ge pingguo", True)]."""
    spans: list[list] = []
    for token in re.findall(r"[A-Za-zÜü:']+|[0-9][0-9.,:%]*|\s+|[^\sA-Za-zÜü0-9]", text):
        if token.isspace() or not (token[0].isalnum() or token[0] in "Üü"):  # spaces and marks join the span
            if spans:
                spans[-1][0] += token
            else:
                spans.append([token, False])
            continue
        kind = is_pinyin_word(token)
        if spans and spans[-1][1] == kind:
            spans[-1][0] += token
        else:
            spans.append([token, kind])
    return [(piece.strip(), kind) for piece, kind in spans if piece.strip()]


HAN_WORD = re.compile(r"[\u4e00-\u9fff]+")


def jieba_words(min_chars: int = 2, max_chars: int = 4) -> tuple[list[str], list[int]]:
    """(words, counts) from jieba's dictionary (about 350k words with corpus counts): the Han-only words of
    min_chars..max_chars characters, in the dictionary's order."""
    text = package_text("jieba", "dict.txt")
    words, counts = [], []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) >= 2 and min_chars <= len(parts[0]) <= max_chars and HAN_WORD.fullmatch(parts[0]):
            words.append(parts[0])
            counts.append(int(parts[1]))
    return words, counts


_JIEBA = None


def word_logprob(text: str) -> float:
    """log P(text) under jieba's word unigram model, along its most probable segmentation (jieba's own DAG and
    route: each word's log(count / total), unknown single characters log(1 / total)): a word prior for ranking
    pinyin conversions (task_s2s.rerank). Higher is more word-like."""
    global _JIEBA
    if _JIEBA is None:
        jieba.setLogLevel(logging.WARNING)  # not its "Building prefix dict ..." lines
        jieba.dt.check_initialized()
        _JIEBA = jieba.dt
    if not text:
        return 0.0
    route: dict = {}
    _JIEBA.calc(text, _JIEBA.get_DAG(text), route)
    return route[0][0]


def lexicon_pairs(n: int, seed: int = 1337, per_row: tuple = (4, 8), min_count: int = 100,
                  power: float = 0.75) -> pd.DataFrame:
    """`n` word-list pairs for the pinyin model, so that it learns words the news never used (编程, 手机):
    source "bian cheng ， shou ji 。", target "编程，手机。". Words of 2-4 characters from jieba's dictionary: each
    word counted at least `min_count` times there (about 31k) once, the remaining draws with probability
    proportional to count ** power (word2vec's smoothing: frequent words often, rare ones sometimes); shuffled,
    per_row[0]..per_row[1] words a row, separated by ， (no sentence context is implied) and ended by 。 as the
    training sentences are. Pronunciations come from pypinyin, phrase-aware, per word."""
    words, counts = jieba_words()
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts, dtype=np.float64)
    sizes = rng.integers(per_row[0], per_row[1] + 1, size=n)
    once = np.flatnonzero(counts >= min_count)
    weights = counts ** power
    extra = rng.choice(len(words), size=max(int(sizes.sum()) - len(once), 0), p=weights / weights.sum())
    picks = rng.permutation(np.concatenate([once, extra]))[:int(sizes.sum())]
    pinyin: dict[int, str] = {}
    sources, targets, at = [], [], 0
    for size in sizes:
        row = picks[at:at + size]
        at += size
        for i in row:
            if i not in pinyin:
                pinyin[i] = to_pinyin(words[i])
        sources.append(" ， ".join(pinyin[i] for i in row) + " 。")
        targets.append("，".join(words[i] for i in row) + "。")
    return pd.DataFrame({"source": sources, "target": targets})
