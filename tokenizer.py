"""Byte-level BPE trained by HF `tokenizers`, served by tiktoken; and a character-level tokenizer with the same
interface.

Training follows GPT-2/GPT-4: split text into chunks with a regex, count each distinct chunk once, then
repeatedly merge the most frequent adjacent pair of tokens. `train_bpe_fast` (what `BPETokenizer.train` uses) has
HF `tokenizers` do the counting and merging in Rust on every core, with the project's split pattern, and
converts its merges to the project's rank table. `train_bpe` is the same algorithm in readable Python, kept as
the reference the fast one is tested against: pair counts are kept in a dict and updated only for the chunks that
contain the merged pair, and the best pair comes from a lazy max-heap.

Encoding and decoding go through a `tiktoken.Encoding` built from the learned ranks (token id == merge rank), so
encoding runs at tiktoken's speed. Special tokens are numbered after the ranks and are never produced from
ordinary text: `encode` treats "<|pad|>" typed by a user as the characters it is made of.
"""
from __future__ import annotations

import heapq
import json
import math
import os
from collections import Counter, defaultdict
from typing import Iterable

import regex
import tiktoken

from fsio import atomic_write_text

FORMAT_VERSION = 1
# GPT-4 (cl100k) split pattern: letters, numbers in groups of up to 3, punctuation runs, whitespace.
# Chinese has no spaces, so a run of Han characters is one chunk; merges then learn characters and words.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The same, except that every Han character is a chunk of its own: merges build characters but never words.
# For pinyin -> characters this makes one source syllable face one target token (a one-to-one alignment).
HANZI_SPLIT_PATTERN = r"\p{Han}|" + SPLIT_PATTERN.replace(r"\p{L}+|", r"(?:(?!\p{Han})\p{L})+|", 1)
PATTERNS = {"bpe": SPLIT_PATTERN, "bpe_hanzi": HANZI_SPLIT_PATTERN}
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|unk|>")
# BERT-style names for the same ids: the classifier reads [CLS] = bos and [SEP] = eos.


# -----------------------------------------------------------------------------
# BPE training

def merge_chunk(ids: list[int], pair: tuple[int, int], new_id: int, deltas: Counter, weight: int) -> list[int]:
    """Replace every occurrence of `pair` in ids by new_id, left to right.

    Adds to `deltas` the change in the counts of the neighbouring pairs (times `weight`, the chunk's frequency),
    so the caller never recounts the chunk: merge_chunk([1, 2, 3, 1, 2], (1, 2), 9, d, 1) -> [9, 3, 9] with
    d == {(2, 3): -1, (9, 3): +1, (3, 1): -1, (3, 9): +1}.
    """
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while True:
        try:
            j = ids.index(a, i)  # C-speed scan to the next candidate
        except ValueError:
            out.extend(ids[i:])
            return out
        if j + 1 < n and ids[j + 1] == b:
            out.extend(ids[i:j])
            if out:  # left neighbour, already in its merged form
                deltas[(out[-1], a)] -= weight
                deltas[(out[-1], new_id)] += weight
            if j + 2 < n:
                deltas[(b, ids[j + 2])] -= weight
                deltas[(new_id, ids[j + 2])] += weight
            out.append(new_id)
            i = j + 2
        else:
            out.extend(ids[i:j + 1])
            i = j + 1


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False,
              pattern: str = SPLIT_PATTERN) -> list[tuple[int, int]]:
    """Learn `vocab_size - 256 - len(SPECIAL_TOKENS)` merges; merge i creates token 256 + i.

    Returns the merges in order. Work per merge is proportional to the chunks that contain the merged pair,
    not to the corpus: counts change only next to the merge sites.
    """
    num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    split = regex.compile(pattern)
    chunk_counts: Counter = Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    # plain dicts, not Counters: a Counter's missing key goes through a Python-level __missing__, and these are
    # touched millions of times
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks that contain it (may hold stale ones)
    for w, (ids, f) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    # max-heap by count, ties broken by the smaller pair; stale entries are skipped when popped
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    token_bytes = [bytes([i]) for i in range(256)]
    known = set(token_bytes)  # tiktoken maps bytes -> rank, so two merges must never make the same bytes
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_merges, desc="bpe merges", unit="merge")
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < 2:
            break  # nothing repeats any more: further merges would only memorise single chunks
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        del pair_counts[pair]
        if merged in known:  # e.g. (a, bc) after (ab, c): tiktoken already reaches these bytes
            continue
        new_id = len(token_bytes)
        merges.append(pair)
        token_bytes.append(merged)
        known.add(merged)
        deltas: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair, ()):
            ids = words[w] = merge_chunk(words[w], pair, new_id, deltas, freqs[w])
            i, last = -1, len(ids) - 1
            for _ in range(ids.count(new_id)):  # the pairs a chunk gains are the new token's, with its neighbours
                i = ids.index(new_id, i + 1)
                if i:
                    where[ids[i - 1], new_id].add(w)
                if i < last:
                    where[new_id, ids[i + 1]].add(w)
        for p, d in deltas.items():
            if p == pair or d == 0:
                continue
            c = pair_counts.get(p, 0) + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return merges


def byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what HF's ByteLevel pre-tokenizer writes): printable symbol -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    moved = [b for b in range(256) if b not in keep]  # the unprintable bytes are shifted past 255
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def hf_bpe(texts: Iterable[str], num_merges: int, progress: bool = False, pattern: str = SPLIT_PATTERN):
    """A HF `tokenizers` byte-level BPE trained on `texts` pre-split by `pattern` (the split tiktoken serves with),
    each piece then written in GPT-2's byte symbols: up to `num_merges` merges, pairs seen once never merged."""
    try:
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers
    except ImportError:
        raise SystemExit("training a BPE tokenizer needs HF tokenizers: pip install tokenizers") from None
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, min_frequency=2, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def train_bpe_fast(texts: Iterable[str], vocab_size: int, progress: bool = False,
                   pattern: str = SPLIT_PATTERN) -> list[tuple[int, int]]:
    """`train_bpe`'s merges, learned by HF `tokenizers` (Rust, all cores) and converted to the project's ids.

    A HF merge is a merge of two byte strings (in GPT-2's byte symbols); merge i again creates id 256 + i.
    Ties between equally frequent pairs may break differently from `train_bpe`: the tables differ slightly,
    the compression does not (tests/test_tokenizer.py)."""
    num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    hf = hf_bpe(texts, num_merges, progress, pattern)
    symbols = byte_symbols()
    ids = {bytes([b]): b for b in range(256)}
    merges: list[tuple[int, int]] = []
    for merge in json.loads(hf.to_str())["model"]["merges"]:
        a, b = (bytes(symbols[c] for c in side) for side in (merge.split(" ") if isinstance(merge, str) else merge))
        if a + b not in ids:  # two merges making the same bytes: tiktoken maps bytes -> rank, so keep the first
            ids[a + b] = 256 + len(merges)
            merges.append((ids[a], ids[b]))
    return merges[:num_merges]


# -----------------------------------------------------------------------------
# Tokenizers

class Tokenizer:
    """Common interface: encode/decode, batch encoding with truncation, padding and attention masks."""

    kind = "base"
    special_tokens: dict[str, int]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|eos|>"]

    @property
    def mask_id(self) -> int:
        return self.special_tokens["<|mask|>"]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def pad_batch(self, seqs: list[list[int]], max_len: int, add_special: bool = True):
        """Truncate to max_len (counting [CLS]/[SEP] when add_special) and right-pad.

        Returns (input_ids, attention_mask) as lists of lists; mask is 1 on real tokens.
        """
        keep = max_len - 2 if add_special else max_len
        rows = [([self.bos_id] + s[:keep] + [self.eos_id]) if add_special else s[:keep] for s in seqs]
        width = max((len(r) for r in rows), default=0)
        ids = [r + [self.pad_id] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        return ids, mask

    def save(self, path: str) -> None:
        """Write `path` (versioned JSON) and `path` with .vocab (one token a line, readable)."""
        atomic_write_text(json.dumps(self.to_dict(), ensure_ascii=False), path)
        atomic_write_text(self.vocab_listing(), os.path.splitext(path)[0] + ".vocab")

    @staticmethod
    def load(path: str) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            return tokenizer_from_dict(json.load(f))


def render_token(b: bytes) -> str:
    """Readable form of a token's bytes: the UTF-8 text where valid, else the bytes as \\xNN escapes."""
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{x:02x}" for x in b)
    return s.encode("unicode_escape").decode("ascii") if not s.isprintable() else s


class BPETokenizer(Tokenizer):
    """Byte-level BPE; `kind` "bpe" splits text like GPT-4 first, "bpe_hanzi" also cuts between Han characters."""

    def __init__(self, merges: list[tuple[int, int]], kind: str = "bpe"):
        self.kind = kind
        self.merges = [tuple(m) for m in merges]
        vocab = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(self.merges):
            vocab[256 + i] = vocab[a] + vocab[b]
        self.vocab = vocab
        n = len(vocab)
        self.special_tokens = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        # token id == merge rank, which is exactly the merge order tiktoken applies
        self.enc = tiktoken.Encoding(
            name="moe-bpe",
            pat_str=PATTERNS[kind],
            mergeable_ranks={b: i for i, b in vocab.items()},
            special_tokens=self.special_tokens,
        )
        self.n_vocab = n + len(SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, progress: bool = False, kind: str = "bpe") -> "BPETokenizer":
        return cls(train_bpe_fast(texts, vocab_size, progress=progress, pattern=PATTERNS[kind]), kind)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # specials in user text stay text

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # a loop, not tiktoken's encode_ordinary_batch: that submits one thread-pool task a text, which for short
        # texts costs more than the encoding (2.3 against 0.8 MB/s on 4 MB of one-line reviews, 2 cores)
        return [self.enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if i < len(self.vocab)]  # specials carry no text
        return self.enc.decode(ids, errors="replace")

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "kind": self.kind, "pat_str": PATTERNS[self.kind],
                "merges": [list(m) for m in self.merges], "special_tokens": list(SPECIAL_TOKENS)}

    def vocab_listing(self) -> str:
        lines = [f"{i}\t{render_token(self.vocab[i])}" for i in range(256, len(self.vocab))]
        lines += [f"{i}\t{s}" for s, i in self.special_tokens.items()]
        return "\n".join(lines) + "\n"


class CharTokenizer(Tokenizer):
    """One id per character seen in training; unseen characters map to <|unk|>."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.n_vocab = len(self.chars) + len(SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, progress: bool = False) -> "CharTokenizer":
        counts: Counter = Counter()
        for t in texts:
            counts.update(t)
        chars = [c for c, _ in counts.most_common(None if vocab_size is None else vocab_size - len(SPECIAL_TOKENS))]
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        unk = self.special_tokens["<|unk|>"]
        return [self.stoi.get(c, unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "kind": self.kind, "chars": self.chars,
                "special_tokens": list(SPECIAL_TOKENS)}

    def vocab_listing(self) -> str:
        return "".join(f"{i}\t{render_token(c.encode())}\n" for i, c in enumerate(self.chars))


def tokenizer_from_dict(d: dict) -> Tokenizer:
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(f"tokenizer format version {d.get('version')!r} is not {FORMAT_VERSION}")
    if tuple(d["special_tokens"]) != SPECIAL_TOKENS:
        raise ValueError("tokenizer special tokens differ from this version's")
    if d["kind"] in PATTERNS:
        if d.get("pat_str", PATTERNS[d["kind"]]) != PATTERNS[d["kind"]]:  # the split decides every encoding
            raise ValueError(f"tokenizer {d['kind']!r} was saved with another split pattern than this version's")
        return BPETokenizer([tuple(m) for m in d["merges"]], d["kind"])
    if d["kind"] == "char":
        return CharTokenizer(d["chars"])
    raise ValueError(f"unknown tokenizer kind {d['kind']!r}")


def even_sample(texts: list[str], sample_mb: float) -> list[str]:
    """Every k-th text, k chosen so that about `sample_mb` MB of UTF-8 remain (all texts when they fit or
    sample_mb is 0): BPE learns from a sample spread over the whole corpus, not from its first part."""
    if sample_mb <= 0:
        return texts
    total = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    step = math.ceil(total / (sample_mb * 1e6))
    return texts if step <= 1 else texts[::step]


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    if kind in PATTERNS:
        return BPETokenizer.train(texts, vocab_size, progress=progress, kind=kind)
    if kind == "char":
        return CharTokenizer.train(texts, None)
    raise ValueError(f"unknown tokenizer {kind!r} (choose bpe, bpe_hanzi or char)")


def load_or_train(kind: str, texts, vocab_size: int, cache_path: str | None = None,
                  progress: bool = True) -> Tokenizer:
    """Train a tokenizer on `texts` (a list, or a function that reads them: called only when there is no
    cached tokenizer), or reuse the one cached at `cache_path`."""
    if cache_path and os.path.exists(cache_path):
        return Tokenizer.load(cache_path)
    tok = train_tokenizer(kind, texts() if callable(texts) else texts, vocab_size, progress=progress)
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tok.save(cache_path)
    return tok
