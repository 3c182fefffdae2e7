"""The classifier's wide part (wide.py, models.Classifier.wide_logits): TF-IDF features equal to scikit-learn's,
a fresh model equal to the fitted linear model, the blend on validation never below the linear model, texts the
vocabulary does not know, and checkpoints from before the wide part."""
import json
import os

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

import data
import task_cls
import wide
from checkpoint import load_checkpoint
from config import ClassifierConfig
from models import Classifier
from test_cli import run_main
from tokenizer import train_tokenizer
from wide import NB_C, SVC_C, VECTORIZER, SparseRows, TextRows, TfidfFeatures, fit_linear, nb_ratios, pad_rows

ODD_TEXTS = ["  多个   空格\t和\n换行 ", "ABC abc AbC", "", "a", "😀表情😀", "好好好好好好"]


@pytest.fixture(scope="module")
def splits():
    """600 / 200 / 200 real reviews of each split."""
    s = data.reviews_splits(quiet=True)
    return {"train": s["train"][:600], "val": s["val"][:200], "test": s["test"][:200]}


def test_features_equal_scikit_learns_tfidf_vectorizer(splits):
    train = list(splits["train"].text)
    features, fitted_rows = TfidfFeatures.fit(train)
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2).fit(train)
    assert features.vocab == list(vec.get_feature_names_out()) and len(features) > 1000
    np.testing.assert_allclose(features.idf, vec.idf_, rtol=1e-6)
    for texts in (train, list(splits["val"].text) + ODD_TEXTS):
        ours = features.rows(texts).matrix(len(features)).toarray()
        np.testing.assert_allclose(ours, vec.transform(texts).toarray(), atol=1e-6)
    same = fitted_rows.matrix(len(features)).toarray()
    np.testing.assert_allclose(same, features.rows(train).matrix(len(features)).toarray(), atol=1e-6)
    # what a checkpoint and an ONNX file carry gives the same rows
    for copy in (TfidfFeatures.from_dict(features.to_dict()), TfidfFeatures.from_dict(features.to_json())):
        for a, b in zip(copy.rows(ODD_TEXTS + train[:20]), features.rows(ODD_TEXTS + train[:20])):
            assert (a[0] == b[0]).all() and np.allclose(a[1], b[1])
    ids, values = pad_rows(features.rows(["", train[0]]))
    assert ids.shape == values.shape and ids[0].eq(0).all() and values[0].eq(0).all()
    assert not features.knows("") and features.knows(train[0])


def test_a_big_training_split_is_counted_on_an_even_sample(splits):
    train = list(splits["train"].text)  # 600 texts; a cap of 200 counts every 3rd
    features, rows = TfidfFeatures.fit(train, max_texts=200)
    vec = TfidfVectorizer(**VECTORIZER).fit(train[::3])
    assert features.vocab == list(vec.get_feature_names_out())
    assert isinstance(rows, TextRows) and len(rows) == 600  # rows for every text, made when asked
    made = SparseRows.of(rows.take(range(600)))
    np.testing.assert_allclose(made.matrix(len(features)).toarray(), vec.transform(train).toarray(), atol=1e-6)
    assert [len(i) for i, _ in rows.take([0, 599])] == [len(made[0][0]), len(made[599][0])]
    # and the linear model that starts the wide part is fitted on the same every-3rd rows
    labels = [int(l == "positive") for l in splits["train"].label]
    weight, bias = fit_linear(rows, labels, len(features), 2, max_texts=200)
    svc = LinearSVC(C=SVC_C).fit(made.matrix(len(features))[::3], labels[::3])
    np.testing.assert_allclose(weight[:, 1] - weight[:, 0], svc.coef_[0], atol=1e-5)


def test_a_fresh_model_is_the_fitted_linear_model(splits):
    """deep_scale starts at 0 and the wide weights are the LinearSVC on the same features: the logit difference
    is the baseline's decision function, on texts it never saw."""
    tokenizer = train_tokenizer("char", list(splits["train"].text), 300)
    cfg = ClassifierConfig(vocab_size=tokenizer.n_vocab, max_len=32, d_model=16, n_heads=2, num_layers=1, d_ff=16,
                           num_experts=2, top_k=1, dropout=0.0, wide=True, wide_fit="svm")
    cls_data = task_cls.ClsData(tokenizer, splits, cfg, "reviews")
    cfg = cls_data.sized(cfg)
    assert cfg.wide_vocab == len(cls_data.features)
    torch.manual_seed(0)
    model = Classifier(cfg)
    cls_data.init_model(model)
    assert model.deep_scale.item() == 0.0
    val = task_cls.evaluate(model, tokenizer, *cls_data.encoded["val"], cfg, 32, torch.device("cpu"), "fp32")
    baseline = task_cls.tfidf_model(splits["train"])
    np.testing.assert_allclose(val["_logits"][:, 1] - val["_logits"][:, 0], baseline.decision_function(
        splits["val"].text), atol=1e-4)
    np.testing.assert_allclose(val["_logits"], val["_wide_logits"], atol=1e-6)
    # the deep part enters through the scale alone; without wide inputs the model gives that share only
    seqs = [cls_data.encoded["val"][0][i] for i in range(4)]
    batch = data.collate_cls(tokenizer, seqs, None, cfg.max_len)
    model.eval()
    with torch.no_grad():
        assert model(**batch)[0].abs().max() == 0
        model.deep_scale.fill_(1.0)
        deep = model(**batch)[0]
    assert deep.abs().max() > 0
    wide_batch = data.collate_cls(tokenizer, seqs, None, cfg.max_len, None,
                                  cls_data.encoded["val"][2][:4])
    with torch.no_grad():
        torch.testing.assert_close(model(**wide_batch)[0], model.wide_logits(wide_batch["wide_ids"],
                                                                             wide_batch["wide_values"]) + deep)


def test_blend_is_never_below_the_wide_part_on_validation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    sign = np.where(y == 1, 1.0, -1.0)
    wide = np.stack([-sign, sign], 1) * 0.5 + rng.normal(0, 1.0, (400, 2))   # right ~70%
    useful = np.stack([-sign, sign], 1) * 0.5 + rng.normal(0, 1.0, (400, 2))  # independent, as good
    noise = rng.normal(0, 3.0, (400, 2))                                       # no signal at all
    for deep, expect_used in ((useful, True), (noise, False)):
        val = {"_wide_logits": wide, "_logits": wide + deep}
        factor = task_cls.blend_deep(val, y)
        blended = task_cls.blended(val, factor)["_logits"]
        assert (blended.argmax(1) == y).mean() >= (wide.argmax(1) == y).mean()
        assert (factor > 0.3) == expect_used, factor


def test_wide_run_reports_its_parts_and_unknown_text_is_unsure(trained_cls):
    ckpt_path, _, summary = trained_cls
    assert summary["test_wide_acc"] > 0.8 and summary["test_deep_acc"] is not None
    assert summary["test_acc"] >= summary["test_wide_acc"] - 0.02 and 0 <= summary["deep_blend"] <= 2
    ckpt = load_checkpoint(ckpt_path, "")
    assert ckpt["model_config"]["wide_vocab"] == len(ckpt["wide_features"]["vocab"]) > 1000
    # no character of this text occurs in the training reviews: the linear part knows none of its n-grams
    got = json.loads(run_main("--infer", "--checkpoint", ckpt_path, "--text", "ⅦⅧⅨ", "--json").stdout)
    assert got["unsure"] is True and set(got["probs"]) == {"negative", "positive"}


def test_checkpoint_from_before_the_wide_part_still_loads_and_answers(trained_cls, tmp_path):
    """A checkpoint as the project wrote it before Step 11: no wide config fields, weights or vocabulary."""
    ckpt = load_checkpoint(trained_cls[0], "")
    for key in ("wide", "wide_vocab"):
        ckpt["model_config"].pop(key)
    ckpt.pop("wide_features")
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items()
                          if k not in ("wide.weight", "wide_bias", "deep_scale")}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    p = task_cls.Predictor(str(old), torch.device("cpu"))
    assert p.features is None and p.model.config.wide_vocab == 0
    got = json.loads(run_main("--infer", "--checkpoint", str(old), "--text", "这家店的菜很好吃", "--json").stdout)
    assert got["label"] in ("negative", "positive") and abs(sum(got["probs"].values()) - 1) < 1e-5


def test_everyday_sets_are_balanced_and_written_for_the_check():
    import pandas as pd
    from bench import EVERYDAY_SENTIMENT
    shipped = set(data.shipped_texts())
    for name, path in EVERYDAY_SENTIMENT.items():
        sentences = pd.read_csv(path, sep="\t", dtype=str)
        counts = sentences.label.value_counts()
        assert len(sentences) >= 60 and set(counts.index) == {"negative", "positive"}, name
        assert abs(counts["negative"] - counts["positive"]) <= 2 and not sentences.text.duplicated().any(), name
        assert not set(sentences.text) & shipped, name


def test_sentiment_benchmark_scores_both_everyday_sets(trained_cls):
    from bench import bench_sentiment
    got = bench_sentiment(trained_cls[0])
    for name in ("everyday", "everyday2"):
        assert got[f"{name}_n"] >= 60 and 0.5 <= got[f"{name}_acc_tfidf"] <= 1
        assert 0 <= got[f"{name}_acc_model"] <= 1 and 0 <= got[f"{name}_sure_wrong_model"] <= got[f"{name}_n"]


@pytest.mark.parametrize("training", ["joint", "own", "both"])
def test_what_the_deep_part_learns_from(training):
    """joint: the summed logits' loss alone (at deep_scale 0 the encoder gets no gradient); own: its own logits'
    cross-entropy alone, the summed loss reaching only the scale; both: the two added."""
    torch.manual_seed(0)
    cfg = ClassifierConfig(vocab_size=40, max_len=12, d_model=16, n_heads=2, num_layers=1, d_ff=16, num_experts=2,
                           top_k=1, dropout=0.0, noisy_gate=False, wide=True, wide_vocab=30, deep_training=training,
                           balance_coef=0.0, z_coef=0.0)
    model = Classifier(cfg)
    torch.nn.init.normal_(model.wide.weight)
    ids, mask = torch.randint(4, 40, (6, 12)), torch.ones(6, 12, dtype=torch.long)
    wide_ids, wide_values, labels = torch.randint(0, 30, (6, 5)), torch.rand(6, 5), torch.randint(0, 2, (6,))
    _, loss, _ = model(ids, mask, wide_ids, wide_values, labels=labels)
    loss.backward()
    head = model.head.weight.grad.clone()
    assert model.deep_scale.grad.abs() > 0  # the scale always learns from the summed logits
    model.zero_grad()
    deep, _ = model.deep_logits(ids, mask)
    torch.nn.functional.cross_entropy(deep, labels).backward()
    own = model.head.weight.grad
    if training == "joint":
        assert head.abs().max() == 0
    else:  # at deep_scale 0 the summed loss sends the encoder nothing: what it gets is its own loss's
        torch.testing.assert_close(head, own)


def test_nbsvm_folds_the_naive_bayes_ratios_into_the_weights(splits):
    """wide_fit=nbsvm: the SVM fitted on the features times their NB log-count ratios r; w·(x∘r) = (w∘r)·x, so
    the model's logits on the plain features equal that SVM's decision on the scaled ones."""
    train = list(splits["train"].text)
    features, rows = TfidfFeatures.fit(train)
    labels = np.array([int(l == "positive") for l in splits["train"].label])
    X = rows.matrix(len(features))
    r = nb_ratios(X, labels == 1)
    assert r[features.index["好"]] > 0 > r[features.index["差"]]  # the ratio has the sentiment's sign
    weight, bias = fit_linear(rows, list(labels), len(features), 2, nb=True)
    svc = LinearSVC(C=NB_C).fit(X.multiply(r).tocsr(), labels)
    val = features.rows(list(splits["val"].text)).matrix(len(features))
    ours = val @ (weight[:, 1] - weight[:, 0]) + (bias[1] - bias[0])
    np.testing.assert_allclose(ours, svc.decision_function(val.multiply(r).tocsr()), atol=1e-4)
    three = np.array([0, 1, 2] * 200)  # more classes: one against the rest each, one column a class
    weight3, bias3 = fit_linear(rows, list(three), len(features), 3, nb=True)
    assert weight3.shape == (len(features), 3) and bias3.shape == (3,)


def test_the_wide_part_is_fitted_once_and_read_back(splits, tmp_path, monkeypatch):
    train = list(splits["train"].text)
    labels = [int(l == "positive") for l in splits["train"].label]
    val = (list(splits["val"].text), [int(l == "positive") for l in splits["val"].label])
    cache = str(tmp_path / "wide.npz")
    features, rows, (weight, bias), used = wide.fit_wide(train, labels, 2, "auto", val, cache=cache)
    right = {}  # auto kept the fit more accurate on validation
    for fit in ("svm", "nbsvm"):
        w, b = fit_linear(rows, labels, len(features), 2, nb=fit == "nbsvm")
        right[fit] = int(((features.rows(val[0]).matrix(len(features)) @ w + b).argmax(1) == val[1]).sum())
    assert right[used] == max(right.values()) and (used == "svm" or right["nbsvm"] > right["svm"])
    monkeypatch.setattr(wide, "fit_linear", lambda *a, **k: pytest.fail("fitted again"))
    again, rows2, (weight2, bias2), used2 = wide.fit_wide(train, labels, 2, "auto", val, cache=cache)
    assert used2 == used and again.vocab == features.vocab and np.array_equal(again.idf, features.idf)
    assert np.array_equal(weight2, weight) and np.array_equal(bias2, bias) and again.ngram_range == (1, 3)
    np.testing.assert_allclose(rows2.matrix(len(again)).toarray(), rows.matrix(len(features)).toarray(), atol=1e-6)
    # ClsData names the file by the split, the labels and the fit: another fit is another file
    monkeypatch.undo()
    monkeypatch.setattr(task_cls, "DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(task_cls, "PACKED_MIN_TEXTS", 100)
    tokenizer = train_tokenizer("char", train, 300)
    for fit in ("svm", "auto", "svm"):
        cfg = ClassifierConfig(vocab_size=tokenizer.n_vocab, max_len=32, d_model=16, n_heads=2, num_layers=1,
                               d_ff=16, num_experts=2, top_k=1, wide=True, wide_fit=fit)
        task_cls.ClsData(tokenizer, splits, cfg, "reviews")
    assert len([f for f in os.listdir(tmp_path / "prepared") if f.startswith("wide_")]) == 2
