"""A labelled table at any size: read a chunk at a time, held-out splits capped, texts encoded once and saved,
the wide part's big training split made per batch, the linear baseline on a stated sample."""
import os

import numpy as np
import pandas as pd
import pytest

import data
import shards
import task_cls
from data import Packed, labelled_frame, read_table, stratified_split
from errors import DataError
from tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def reviews():
    return data.reviews_splits(quiet=True)["train"][:3000].reset_index(drop=True)


@pytest.fixture
def table(tmp_path, reviews):
    """3,000 real reviews with exact duplicates and a text given two labels, each spread across chunks."""
    df = reviews.copy()
    df = pd.concat([df, df[:40], pd.DataFrame({"text": [df.text[5]], "label": ["neutral"]})], ignore_index=True)
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    df["extra"] = range(len(df))  # a column the classifier does not read
    path = tmp_path / "reviews.csv"
    df.to_csv(path, index=False)
    return str(path)


def test_a_table_read_in_chunks_equals_it_read_whole(table, monkeypatch):
    monkeypatch.setattr(data, "TABLE_ROWS", 256)  # 12 chunks
    whole = read_table(table)
    expect = data.clean_labelled(whole.text, whole.label)
    got = labelled_frame(table, "text", "label")
    pd.testing.assert_frame_equal(got, expect)
    assert len(got) == 2999  # 40 duplicates dropped, the text with two labels dropped


def test_an_empty_label_deep_in_a_table_is_named_by_its_row(table, monkeypatch):
    monkeypatch.setattr(data, "TABLE_ROWS", 256)
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    df.loc[2344, "label"] = ""
    df.to_csv(table, index=False)
    with pytest.raises(DataError, match=r"empty or NaN 'label' in data row\(s\) 2345; give every row a label"):
        labelled_frame(table, "text", "label")


def test_held_out_splits_are_capped_for_a_big_table(reviews):
    small = stratified_split(reviews, seed=1)
    assert [len(small[s]) for s in ("val", "test")] == [300, 300]  # 10% each below the cap
    big = stratified_split(reviews, seed=1, held_out_rows=200)
    assert [len(big[s]) for s in ("val", "test")] == [200, 200] and len(big["train"]) == 2600
    texts = [set(big[s].text) for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    share = (reviews.label == "positive").mean()
    for s in ("val", "test"):  # stratified: each keeps the table's class shares
        assert abs((big[s].label == "positive").mean() - share) < 0.01


def test_texts_are_encoded_once_in_workers_and_read_back(reviews, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "DATASET_DIR", str(tmp_path / "dataset"))
    monkeypatch.setattr(shards, "PACKED_MIN_TEXTS", 100)
    monkeypatch.setattr(shards, "PACKED_CHUNK", 700)  # 5 chunks over 2 workers
    texts = list(reviews.text)
    tok = BPETokenizer.train(texts[:500], 400)
    for size in (None, 16):
        expect = Packed.windows_of(tok, texts, size)
        got = shards.packed(tok, texts, size, workers=2)
        assert np.array_equal(got.ids, expect.ids) and np.array_equal(got.offsets, expect.offsets)
    saved = sorted(os.listdir(tmp_path / "dataset" / "prepared"))
    assert len(saved) == 2 and all(f.endswith(".npz") for f in saved)

    def no_workers(*args, **kwargs):
        raise AssertionError("the saved encoding should have been read")

    monkeypatch.setattr(shards, "ProcessPoolExecutor", no_workers)
    again = shards.packed(tok, texts, 16)
    assert np.array_equal(again.ids, expect.ids) and again[7] == expect[7]
    with pytest.raises(AssertionError):  # other texts are not the saved ones
        shards.packed(tok, texts[1:], 16)
    assert shards.packed(tok, texts[:50], 16)[3] == Packed.windows_of(tok, texts[:50], 16)[3]  # few: not saved


def test_the_linear_baseline_past_its_sample_size_fits_every_kth_row(reviews):
    splits = {"train": reviews, "val": reviews[:300], "test": reviews[300:600]}
    sampled = task_cls.tfidf_model(reviews, max_texts=1000)  # every 3rd of 3,000
    direct = task_cls.tfidf_model(reviews.iloc[::3])
    assert sampled[0].vocabulary_ == direct[0].vocabulary_
    np.testing.assert_allclose(sampled[-1].coef_, direct[-1].coef_, atol=1e-4)  # liblinear's own shuffling
    assert task_cls.tfidf_baseline(splits)["fit_rows"] == 3000


def test_packed_sequences_cut_to_a_length(reviews):
    tok = BPETokenizer.train(list(reviews.text[:300]), 300)
    seqs = Packed.windows_of(tok, list(reviews.text[:200]))
    cut = seqs.truncated(7)
    assert len(cut) == 200 and all(cut[i] == seqs[i][:7] for i in range(200))
    assert cut[3:6] == [seqs[i][:7] for i in range(3, 6)] and (cut.lengths() <= 7).all()


def test_pairs_read_in_chunks_and_split_with_capped_held_out(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TABLE_ROWS", 100)
    pairs = pd.DataFrame({"question": [f"第{i}问" for i in range(1000)], "answer": [f"答{i}" for i in range(1000)]})
    path = tmp_path / "qa.jsonl"
    pairs.to_json(path, orient="records", lines=True, force_ascii=False)
    got = data.pair_frame(str(path))
    assert list(got.source) == list(pairs.question) and list(got.target) == list(pairs.answer)
    assert [len(s) for s in data.user_pair_splits(str(path), seed=1).values()] == [900, 50, 50]
    monkeypatch.setattr(data, "HELD_OUT_ROWS", 30)
    splits = data.user_pair_splits(str(path), seed=1)
    assert [len(s) for s in splits.values()] == [940, 30, 30]
    pairs.loc[734, "answer"] = " "
    pairs.to_json(path, orient="records", lines=True, force_ascii=False)
    with pytest.raises(DataError, match="row 735 has an empty 'answer'"):
        data.pair_frame(str(path))
