"""Token shards: a corpus streamed into uint16 files once, reused, resumed, checked; bad input in one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import shards
from data import people_daily_paragraphs
from errors import DataError
from shards import Corpus, TokenStream, intact, prepare, split_of
from tokenizer import BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paragraphs():
    return people_daily_paragraphs()[:4000]


@pytest.fixture(scope="module")
def tok(paragraphs):
    return BPETokenizer.train(paragraphs[:500], 600)


@pytest.fixture
def small_blocks(monkeypatch, tmp_path):
    """Blocks of 20 kB and shards of 30k tokens, so a 1 MB corpus makes many of each; shards go to tmp_path."""
    monkeypatch.setattr(shards, "BLOCK_BYTES", 20_000)
    monkeypatch.setattr(shards, "SHARD_TOKENS", 30_000)
    monkeypatch.setattr(data, "TABLE_ROWS", 300)
    monkeypatch.setattr(shards, "DATASET_DIR", str(tmp_path / "dataset"))


def corpus_dir(tmp_path, paragraphs):
    """A directory of two text files and a jsonl table (its "body" column) in a subfolder, plus a file to skip."""
    root = tmp_path / "corpus"
    (root / "more").mkdir(parents=True)
    (root / "a.txt").write_text("\n".join(paragraphs[:1500]) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n\n".join(paragraphs[1500:3000]), encoding="utf-8")  # blank lines between
    import pandas as pd
    pd.DataFrame({"body": paragraphs[3000:4000], "n": range(1000)}).to_json(root / "more" / "c.jsonl",
                                                                             orient="records", lines=True,
                                                                             force_ascii=False)
    (root / "notes.md").write_text("not a corpus file", encoding="utf-8")
    return root


def expected_streams(tok, docs, share):
    out = {s: [] for s in ("train", "val", "test")}
    for d in docs:
        out[split_of(d, share)] += tok.encode(d) + [tok.eos_id]
    return out


def streams(folder, manifest):
    return {s: TokenStream.of_split(folder, manifest, s) for s in ("train", "val", "test")}


def test_shards_hold_every_document_once_in_its_hashed_split(tmp_path, small_blocks, paragraphs, tok):
    corpus = Corpus.of(str(corpus_dir(tmp_path, paragraphs)), text_col="body")
    assert [os.path.basename(f) for f in corpus.files] == ["a.txt", "b.txt", "c.jsonl"]  # notes.md skipped
    folder, manifest = prepare(corpus, tok, workers=2, quiet=True)
    assert manifest["dtype"] == "uint16" and len(manifest["splits"]["train"]["shards"]) > 3
    got = streams(folder, manifest)
    want = expected_streams(tok, paragraphs[:4000], corpus.held_out_share())
    for s in want:
        assert got[s].span(0, len(got[s])).tolist() == want[s]  # corpus order, across every shard boundary
        assert manifest["splits"][s]["tokens"] == len(want[s])
    assert sum(v["documents"] for v in manifest["splits"].values()) == 4000
    assert 0.03 < manifest["splits"]["val"]["documents"] / 4000 < 0.07  # 5% each, by hash
    assert manifest["splits"]["train"]["chars"] == sum(len(p) + 1 for p in paragraphs[:4000]
                                                      if split_of(p, 0.05) == "train")
    # the tokenizer's sample: training documents only, from every k-th block
    sample = corpus.sample(0.2)
    assert 0 < len(sample) < 0.5 * 4000 and all(split_of(t, 0.05) == "train" for t in sample)


def test_windows_cross_shard_ends():
    stream = TokenStream([np.arange(0, 5), np.arange(5, 7), np.arange(7, 20)], chars=40)
    assert len(stream) == 20 and stream.span(3, 10).tolist() == list(range(3, 13))
    batch = stream.windows([0, 4, 12], T=6, device="cpu")
    assert batch["idx"][1].tolist() == list(range(4, 10)) and batch["targets"][1].tolist() == list(range(5, 11))


def test_a_second_run_reuses_the_shards_and_an_edited_corpus_prepares_again(tmp_path, small_blocks, paragraphs,
                                                                             tok, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(paragraphs[:800]), encoding="utf-8")
    folder, manifest = prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)
    calls = []
    write = shards.write_shards
    monkeypatch.setattr(shards, "write_shards", lambda *a, **k: calls.append(1) or write(*a, **k))
    assert prepare(Corpus.of(str(src)), tok, workers=1, quiet=True) == (folder, manifest) and not calls
    src.write_text("\n".join(paragraphs[:801]), encoding="utf-8")
    folder2, manifest2 = prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)
    assert calls and folder2 != folder and manifest2["splits"]["train"]["documents"] + \
        manifest2["splits"]["val"]["documents"] + manifest2["splits"]["test"]["documents"] == 801
    other = BPETokenizer.train(paragraphs[:300], 400)  # another tokenizer: shards of its own
    assert prepare(Corpus.of(str(src)), other, workers=1, quiet=True)[0] not in (folder, folder2)


def test_an_interrupted_preparation_goes_on_where_it_stopped(tmp_path, small_blocks, paragraphs, tok, monkeypatch,
                                                             capsys):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(paragraphs), encoding="utf-8")
    corpus = Corpus.of(str(src))
    tasks = Corpus.tasks

    def interrupted(self):
        for i, item in enumerate(tasks(self)):
            if i == 40:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(Corpus, "tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tok, workers=2, quiet=True)
    folder = shards.shard_dir(corpus, tok)
    assert not os.path.exists(os.path.join(folder, "manifest.json"))  # nothing a later run would trust as done
    done = shards.read_json(os.path.join(folder, "progress.json"))["done"]
    assert 0 < done <= 40
    monkeypatch.setattr(Corpus, "tasks", tasks)
    folder, manifest = prepare(corpus, tok, workers=2, quiet=False)
    assert f"after {done} blocks" in capsys.readouterr().err
    want = expected_streams(tok, paragraphs, corpus.held_out_share())
    for s, stream in streams(folder, manifest).items():
        assert stream.span(0, len(stream)).tolist() == want[s]
    assert not os.path.exists(os.path.join(folder, "progress.json"))


def test_a_damaged_shard_is_noticed_and_prepared_again(tmp_path, small_blocks, paragraphs, tok, capsys):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(paragraphs[:1500]), encoding="utf-8")
    folder, manifest = prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)
    want = TokenStream.of_split(folder, manifest, "train").span(0, manifest["splits"]["train"]["tokens"]).tolist()
    shard = os.path.join(folder, manifest["splits"]["train"]["shards"][1]["file"])
    with open(shard, "r+b") as f:
        f.truncate(100)
    folder, manifest = prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)
    assert "missing or changed" in capsys.readouterr().err
    assert TokenStream.of_split(folder, manifest, "train").span(0, len(want)).tolist() == want
    os.remove(shard)
    assert prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)[1] == manifest


def test_two_runs_preparing_the_same_corpus_at_once(tmp_path, paragraphs, tok):
    """Two processes, as two runs would be: one prepares, the other waits on the lock and reuses the result."""
    src = tmp_path / "c.txt"
    src.write_text("\n".join(paragraphs[:2000]), encoding="utf-8")
    tok.save(str(tmp_path / "tok.json"))
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); import shards; from tokenizer import Tokenizer\n"
            f"shards.BLOCK_BYTES, shards.SHARD_TOKENS = 20_000, 30_000\n"
            f"shards.DATASET_DIR = {str(tmp_path / 'dataset')!r}\n"
            f"tok = Tokenizer.load({str(tmp_path / 'tok.json')!r})\n"
            f"print(json.dumps(shards.prepare(shards.Corpus.of({str(src)!r}), tok, workers=1, quiet=True)))")
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outs]
    assert json.loads(outs[0][0]) == json.loads(outs[1][0])
    folder, manifest = json.loads(outs[0][0])
    assert len(os.listdir(tmp_path / "dataset" / "shards")) == 1 and intact(folder, manifest)


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, small_blocks, paragraphs, tok, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(paragraphs[:2000]), encoding="utf-8")
    writes = []
    real = shards.atomic_write

    def filling(path):
        writes.append(path)
        if len(writes) > 4:
            raise OSError(28, "No space left on device")
        return real(path)
    monkeypatch.setattr(shards, "atomic_write", filling)
    with pytest.raises(DataError, match="No space left on device.*goes on from them"):
        prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)
    folder = shards.shard_dir(Corpus.of(str(src)), tok)
    assert not os.path.exists(os.path.join(folder, "manifest.json"))
    monkeypatch.setattr(shards, "atomic_write", real)
    assert prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)[1]["splits"]["train"]["documents"] > 0


@pytest.mark.parametrize("make,expect", [
    (lambda d: d.mkdir(), "no .txt/.csv/.tsv/.jsonl/.parquet file"),
    (lambda d: None, "file not found"),
])
def test_bad_corpus_paths(tmp_path, make, expect):
    make(tmp_path / "x")
    with pytest.raises(DataError, match=expect):
        Corpus.of(str(tmp_path / "x"))
    with pytest.raises(DataError, match="matches no file"):
        Corpus.of(str(tmp_path / "*.nothing"))


def test_a_bad_byte_deep_in_a_file_is_named_with_its_offset(tmp_path, small_blocks, paragraphs, tok):
    good = ("\n".join(paragraphs[:300]) + "\n").encode("utf-8")
    src = tmp_path / "c.txt"
    src.write_bytes(good + b"\xff\xfe bad\n" + good)
    with pytest.raises(DataError, match=rf"c.txt: not UTF-8 \(bad byte 0xff at offset {len(good)}\)"):
        prepare(Corpus.of(str(src)), tok, workers=2, quiet=True)
    src.write_bytes(good + b"\x00\x01")
    with pytest.raises(DataError, match=rf"looks binary \(a NUL byte at offset {len(good)}\)"):
        prepare(Corpus.of(str(src)), tok, workers=1, quiet=True)


@pytest.mark.parametrize("block", [1, 2, 5, 7, 1 << 22])
def test_the_utf8_check_reads_blocks_and_names_the_first_bad_byte(tmp_path, block):
    from data import check_utf8
    good = "我爱编程，今天天气很好。".encode() * 50
    path = tmp_path / "t.txt"
    path.write_bytes(good)
    check_utf8(str(path), block)  # characters cut by a block's end are not errors
    for bad in (b"\xff" + good, "我".encode()[:2]):  # a bad byte inside; a character cut by the file's end
        path.write_bytes(good + bad)
        with pytest.raises(DataError, match=rf"not UTF-8 \(bad byte 0x.. at offset {len(good)}\)"):
            check_utf8(str(path), block)


def test_documents_encoded_joined_equal_one_call_a_document(paragraphs, tok):
    from shards import encode_documents
    docs = [p[:80] for p in paragraphs[:300]] + ["句末标点。", "abc", "123", "😀！", "x"]
    assert shards.no_newline_merges(tok)
    want = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert encode_documents(tok, docs, "uint16").tolist() == want
    assert encode_documents(tok, ["两行\n之间", "b"], "uint16").tolist() == [  # a newline inside: one call each
        *tok.encode("两行\n之间"), tok.eos_id, *tok.encode("b"), tok.eos_id]
