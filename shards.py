"""A text corpus of any size, prepared once into token shards and read back as np.memmap windows.

nanoGPT's train.bin / val.bin, for corpora that do not fit in memory: the files are streamed in blocks, worker
processes (one per core) decode and tokenize them, and the main process appends the ids to uint16 shards (uint32
when the vocabulary needs it), one file set per split. A manifest written last (atomically, after every shard)
lists the shards, their token counts and what they were made from (the files' names, sizes and modification
times, the tokenizer's digest): a second run on the same corpus and tokenizer only checks it and starts; an
edited file or another tokenizer prepares again, in a folder of its own. An interrupted preparation keeps the
shards a progress file lists and goes on after them; a shard deleted or truncated by hand is noticed (its size
no longer matches the manifest) and the corpus is prepared again.

Splits: the built-in corpus comes split (one file per split); a user's corpus is cut by a hash of each document
(a non-empty line, or a table row's text), so the split does not depend on file order or size: val and test each
take HELD_OUT_SHARE of the documents, or less for a big corpus (about HELD_OUT_MB of text each at most).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import numpy as np
import torch
from tqdm import tqdm

from data import DATASET_DIR, FORMATS, SPLITS, Packed, not_utf8, table_chunks, texts_digest, windows
from errors import DataError
from fsio import atomic_write, atomic_write_text, exclusive, read_cache, write_cache
from tokenizer import tokenizer_from_dict

FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 22       # text a worker reads, decodes and tokenizes at a time (4 MB, cut at a line end)
SHARD_TOKENS = 1 << 24      # a train shard is written out (with the held-out ids so far) at this many tokens
HELD_OUT_SHARE = 0.05       # val and test each: this share of the documents ...
HELD_OUT_MB = 5.0           # ... or, for a big corpus, the share that makes about this many MB of text each


# -----------------------------------------------------------------------------
# Where the text is

@dataclass
class Corpus:
    """The files of a corpus, in order. `split_files` ({split: path}) when the splits come made (the built-in
    corpus); otherwise each document's split is drawn from its hash."""
    files: list[str]
    text_col: str = "text"
    split_files: dict = field(default_factory=dict)

    @classmethod
    def of(cls, spec: str, text_col: str = "text") -> "Corpus":
        """A text file, a csv/tsv/jsonl/parquet file (its `text_col`), a directory (its text and table files,
        recursively) or a glob."""
        if any(c in spec for c in "*?["):
            files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not files:
                raise DataError(f"{spec}: the pattern matches no file")
        elif os.path.isdir(spec):
            files = sorted(os.path.join(d, n) for d, _, names in os.walk(spec) for n in names
                           if os.path.splitext(n)[1].lower() in (".txt", *FORMATS))
            if not files:
                raise DataError(f"{spec}: no .txt/.csv/.tsv/.jsonl/.parquet file in this directory")
        elif os.path.isfile(spec):
            files = [spec]
        else:
            raise DataError(f"{spec}: file not found")
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise DataError(f"{empty[0]}: file is empty")
        return cls([f for f in files if f not in empty], text_col)

    @classmethod
    def presplit(cls, split_files: dict) -> "Corpus":
        return cls([split_files[s] for s in SPLITS], "text", dict(split_files))

    @property
    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def key(self) -> str:
        """Changes when a file is added, removed, resized or rewritten (its modification time)."""
        stats = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.files]
        return hashlib.sha256(json.dumps([stats, self.text_col, self.split_files]).encode()).hexdigest()

    def held_out_share(self) -> float:
        return min(HELD_OUT_SHARE, HELD_OUT_MB * 1e6 / max(self.total_bytes, 1))

    def tasks(self):
        """(split or None, path, payload) work items in corpus order: a text file's byte range, or table rows."""
        for path in self.files:
            split = next((s for s, p in self.split_files.items() if p == path), None)
            if os.path.splitext(path)[1].lower() in FORMATS:
                for chunk in table_chunks(path, [self.text_col]):
                    yield split, path, [str(t) for t in chunk[self.text_col].tolist() if t is not None]
            else:
                for start, end in text_blocks(path):
                    yield split, path, (start, end)

    def documents(self, split: str, every: int = 1):
        """The documents of one split, in corpus order, from every `every`-th block of text (or of table rows)."""
        share = self.held_out_share()
        for i, (given, path, payload) in enumerate(self.tasks()):
            if i % every == 0 and given in (None, split):
                yield from (doc for doc in documents(path, payload) if (given or split_of(doc, share)) == split)

    def sample(self, sample_mb: float) -> list[str]:
        """An even sample of the training documents, about `sample_mb` MB of text (0: all of them), for the
        tokenizer: whole blocks spread over the corpus, so that reading it costs the sample, not the corpus."""
        every = max(1, math.ceil(self.total_bytes / (sample_mb * 1e6))) if sample_mb > 0 else 1
        return list(self.documents("train", every))

    @property
    def name(self) -> str:
        return self.files[0] + (f" and {len(self.files) - 1} more files" if len(self.files) > 1 else "")

    def fingerprint(self) -> dict:
        return {"files": self.name, "bytes": self.total_bytes, "key": self.key()[:16]}


def text_blocks(path: str):
    """(start, end) byte ranges of about BLOCK_BYTES, each ending at a line end (or the file's end)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + BLOCK_BYTES, size))
            f.readline()  # on to the end of that line
            end = min(f.tell(), size)
            yield start, end
            start = end


def documents(path: str, payload) -> list[str]:
    """The non-empty, stripped documents of one work item: the lines of a text file's byte range, or table rows."""
    if isinstance(payload, list):
        return [t for t in (str(t).strip() for t in payload) if t]
    start, end = payload
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    if (nul := raw.find(b"\x00")) >= 0:
        raise DataError(f"{path}: looks binary (a NUL byte at offset {start + nul}); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, raw, e, start) from None
    return [line for line in (line.strip() for line in text.splitlines()) if line]


def split_of(doc: str, share: float) -> str:
    """val, test or train, from the document's hash: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") / 2 ** 64
    return "val" if h < share else "test" if h < 2 * share else "train"


# -----------------------------------------------------------------------------
# Preparing: workers tokenize, the main process writes shards in corpus order

_worker_tokenizer = None


def _start_worker(tokenizer_dict: dict) -> None:
    global _worker_tokenizer
    torch.set_num_threads(1)
    _worker_tokenizer = tokenizer_from_dict(tokenizer_dict)


def encode_task(split: str | None, path: str, payload, share: float, dtype: str) -> dict:
    """{split: (ids with an eos after each document, characters, documents)} for one work item."""
    tok = _worker_tokenizer
    docs = {s: [] for s in SPLITS}
    for doc in documents(path, payload):
        docs[split or split_of(doc, share)].append(doc)
    return {s: (encode_documents(tok, texts, dtype), sum(len(t) + 1 for t in texts), len(texts))
            for s, texts in docs.items() if texts}


def encode_documents(tok, texts: list[str], dtype: str) -> np.ndarray:
    """The documents' ids, each followed by <|eos|>. With a BPE whose only token holding a newline is the
    newline byte itself, in one call on the documents joined by newlines (20% faster than a call a document):
    a newline is then a token of its own that no merge crosses, so the ids are the same, and each newline
    becomes the eos."""
    joined = "\n".join(texts)
    if tok.kind != "char" and joined.count("\n") == len(texts) - 1 and no_newline_merges(tok):
        ids = np.asarray(tok.encode(joined) + [NEWLINE], dtype=np.int64)
        ids[ids == NEWLINE] = tok.eos_id
        return ids.astype(dtype)
    seqs = tok.encode_batch(texts)
    return np.fromiter(chain.from_iterable(seq + [tok.eos_id] for seq in seqs), dtype=dtype,
                       count=sum(len(seq) + 1 for seq in seqs))


NEWLINE = 10  # the newline byte's id in a byte-level BPE


@lru_cache(maxsize=4)
def no_newline_merges(tok) -> bool:
    return not any(b"\n" in token for i, token in tok.vocab.items() if i != NEWLINE)


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()


def shard_dir(corpus: Corpus, tokenizer) -> str:
    return os.path.join(DATASET_DIR, "shards", f"{corpus.key()[:16]}_{tokenizer_digest(tokenizer)[:12]}")


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def intact(folder: str, manifest: dict) -> bool:
    """Every shard the manifest lists is there with exactly its tokens' bytes."""
    size = np.dtype(manifest["dtype"]).itemsize
    return all(os.path.exists(p := os.path.join(folder, sh["file"])) and os.path.getsize(p) == sh["tokens"] * size
               for split in manifest["splits"].values() for sh in split["shards"])


def prepare(corpus: Corpus, tokenizer, workers: int | None = None, quiet: bool = False) -> tuple[str, dict]:
    """The corpus's shards for this tokenizer: (folder, manifest), prepared now unless a run already did."""
    folder = shard_dir(corpus, tokenizer)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = read_json(manifest_path)
    if manifest and intact(folder, manifest):
        return folder, manifest
    with exclusive(os.path.join(folder, ".lock"), f"preparing {folder}", wait=True):
        manifest = read_json(manifest_path)  # another run may have finished it while this one waited
        if manifest and intact(folder, manifest):
            return folder, manifest
        if manifest:
            print(f"note: a shard in {folder} is missing or changed since it was written; preparing again",
                  file=sys.stderr)
            os.remove(manifest_path)
            for name in os.listdir(folder):
                if name.endswith(".bin") or name == "progress.json":
                    os.remove(os.path.join(folder, name))
        try:
            manifest = write_shards(corpus, tokenizer, folder, workers or os.cpu_count() or 1, quiet)
        except OSError as e:
            raise DataError(f"{folder}: cannot write the token shards ({e.strerror or e}); the shards written so "
                            "far are kept and a later run goes on from them") from None
        atomic_write_text(json.dumps(manifest, ensure_ascii=False, indent=1), manifest_path)
    return folder, manifest


def write_shards(corpus: Corpus, tokenizer, folder: str, workers: int, quiet: bool) -> dict:
    dtype = "uint16" if tokenizer.n_vocab <= 2 ** 16 else "uint32"
    progress_path = os.path.join(folder, "progress.json")
    state = read_json(progress_path) or {"done": 0, "bytes": 0,
                                         "splits": {s: {"shards": [], "chars": 0, "documents": 0} for s in SPLITS}}
    if state["done"] and not quiet:
        print(f"note: going on with the interrupted preparation in {folder} after {state['done']} blocks",
              file=sys.stderr)
    buffers = {s: [] for s in SPLITS}

    def flush() -> None:  # every split's ids so far become shards, then the progress file says so
        for s, parts in buffers.items():
            if parts:
                name = f"{s}_{len(state['splits'][s]['shards']):05d}.bin"
                ids = np.concatenate(parts)
                with atomic_write(os.path.join(folder, name)) as tmp:
                    ids.tofile(tmp)
                state["splits"][s]["shards"].append({"file": name, "tokens": int(len(ids))})
                parts.clear()
        atomic_write_text(json.dumps(state), progress_path)

    share = corpus.held_out_share()
    bar = tqdm(total=corpus.total_bytes, initial=state["bytes"], unit="B", unit_scale=True, desc="token shards",
               disable=quiet, mininterval=1.0)
    tasks = enumerate(corpus.tasks())
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(tokenizer.to_dict(),)) as pool:
        pending = deque()
        while True:
            for i, (split, path, payload) in tasks:  # keep 2 items a worker in flight: memory stays bounded
                if i < state["done"]:
                    continue
                size = (payload[1] - payload[0] if isinstance(payload, tuple)
                        else sum(len(t.encode("utf-8", "surrogatepass")) for t in payload))  # bytes, as the bar
                pending.append((pool.submit(encode_task, split, path, payload, share, dtype), size))
                if len(pending) >= 2 * workers:
                    break
            if not pending:
                break
            future, size = pending.popleft()
            for s, (ids, chars, docs) in future.result().items():
                buffers[s].append(ids)
                state["splits"][s]["chars"] += chars
                state["splits"][s]["documents"] += docs
            state["done"] += 1
            state["bytes"] += size
            bar.update(size)
            if sum(len(a) for a in buffers["train"]) >= SHARD_TOKENS:
                flush()
    bar.close()
    flush()
    splits = {s: {**v, "tokens": sum(sh["tokens"] for sh in v["shards"])} for s, v in state["splits"].items()}
    os.remove(progress_path)
    return {"version": FORMAT_VERSION, "dtype": dtype, "corpus": corpus.key(), "files": corpus.files,
            "tokenizer": tokenizer_digest(tokenizer), "held_out_share": share, "splits": splits}


# -----------------------------------------------------------------------------
# A labelled table's texts: encoded once, in workers, into a packed int32 array

PACKED_MIN_TEXTS = 20_000   # fewer texts encode in a few seconds: they are not saved
PACKED_CHUNK = 20_000       # texts a worker encodes at a time


def encode_chunk(texts: list[str], size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A worker's share of packed(): (the ids, int32; each sequence's length)."""
    seqs = _worker_tokenizer.encode_batch(texts)
    seqs = windows(seqs, size) if size else seqs
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    return np.fromiter(chain.from_iterable(seqs), np.int32, int(lengths.sum())), lengths


def packed(tokenizer, texts: list[str], size: int | None = None, workers: int | None = None,
           quiet: bool = True) -> Packed:
    """Packed.windows_of(tokenizer, texts, size), encoded once: by worker processes (one per core), saved under
    dataset/prepared/ by a digest of the texts, the tokenizer and `size`, and read back by any later run on the
    same texts. Fewer than PACKED_MIN_TEXTS texts are encoded here, not saved."""
    if len(texts) < PACKED_MIN_TEXTS:
        return Packed.windows_of(tokenizer, texts, size)
    key = hashlib.sha256(f"{texts_digest(texts)} {tokenizer_digest(tokenizer)} {size}".encode()).hexdigest()
    path = os.path.join(DATASET_DIR, "prepared", f"{key[:32]}.npz")
    saved = read_cache(path, "ids", "offsets")
    if saved:
        return Packed.of_arrays(*saved)
    chunks = [texts[i:i + PACKED_CHUNK] for i in range(0, len(texts), PACKED_CHUNK)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1, initializer=_start_worker,
                             initargs=(tokenizer.to_dict(),)) as pool:
        done = list(tqdm(pool.map(encode_chunk, chunks, [size] * len(chunks)), total=len(chunks), unit="chunk",
                         desc=f"encoding {len(texts):,} texts", disable=quiet, mininterval=1.0))
    ids = np.concatenate([i for i, _ in done])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([n for _, n in done]))])
    write_cache(path, "the encoded texts", ids=ids, offsets=offsets)
    return Packed.of_arrays(ids, offsets)


# -----------------------------------------------------------------------------
# Reading

class ShardFile:
    """One shard's ids, read a slice at a time through a fresh np.memmap that is copied out and dropped: the
    pages of a long-lived map stay in the process's resident memory once touched, so it would grow with the
    share of the corpus training has read (nanoGPT re-creates its memmap every batch for the same reason)."""

    def __init__(self, path: str, dtype: str, tokens: int):
        self.path, self.dtype, self.tokens = path, np.dtype(dtype), tokens

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(self.tokens)
        if stop <= start:
            return np.zeros(0, self.dtype)
        return np.array(np.memmap(self.path, self.dtype, mode="r", offset=start * self.dtype.itemsize,
                                  shape=(stop - start,)))


class TokenStream:
    """A split as one stream of token ids (its shards one after another, read a window at a time), with its
    character count (for bits per character). Documents are separated by <|eos|>, so a window may run over a
    shard's end."""

    def __init__(self, arrays: list, chars: int):
        self.arrays = [a for a in arrays if len(a)]
        self.ends = np.cumsum([len(a) for a in self.arrays])
        self.chars = chars

    @classmethod
    def of_texts(cls, tokenizer, texts: list[str]) -> "TokenStream":
        return cls([encode_documents(tokenizer, texts, "int64")], sum(len(t) + 1 for t in texts))

    @classmethod
    def of_split(cls, folder: str, manifest: dict, split: str) -> "TokenStream":
        info = manifest["splits"][split]
        return cls([ShardFile(os.path.join(folder, sh["file"]), manifest["dtype"], sh["tokens"])
                    for sh in info["shards"]], info["chars"])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def span(self, start: int, n: int) -> np.ndarray:
        """Ids start .. start + n - 1."""
        out, k = [], int(np.searchsorted(self.ends, start, side="right"))
        while n > 0:
            offset = start - (int(self.ends[k - 1]) if k else 0)
            piece = self.arrays[k][offset:offset + n]
            out.append(piece)
            start, n, k = start + len(piece), n - len(piece), k + 1
        return np.concatenate(out) if len(out) > 1 else out[0]

    def windows(self, starts, T: int, device) -> dict:
        rows = torch.from_numpy(np.stack([self.span(int(i), T + 1) for i in starts]).astype(np.int64))  # (B, T + 1)
        return {"idx": rows[:, :-1].to(device), "targets": rows[:, 1:].to(device)}
