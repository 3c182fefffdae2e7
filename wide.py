"""The classifier's wide part: TF-IDF over character n-grams, and the linear model that starts it.

The features are exactly scikit-learn's `TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True,
min_df=2)` (tests/test_wide.py checks them value by value): lower-cased text with runs of whitespace made one
space, every character 1-3-gram, tf = 1 + log(count), times idf = ln((1 + n) / (1 + df)) + 1, L2-normalised.
scikit-learn fits the vocabulary and the IDF once; after that the features are computed here from a plain
vocabulary list and IDF array, which is all a checkpoint or an ONNX file carries (nothing pickled).

A text's features are a sparse row: (ids, values) of its n-grams found in the vocabulary; a split's rows are kept
together in CSR form (`SparseRows`), or, for a training split past FIT_TEXTS texts, made a batch at a time
(`TextRows`). The model reads a batch of them as two padded (B, F) arrays, id 0 / value 0.0 in the padding
(models.Classifier.wide_logits).
"""
from __future__ import annotations

import re
from collections import Counter
from itertools import repeat

import numpy as np
import torch

from fsio import read_cache, write_cache

WHITESPACE = re.compile(r"\s\s+")  # scikit-learn's char analyzer makes each run of 2+ whitespace one space

# The TF-IDF + LinearSVC baseline's settings (task_cls.tfidf_model): the wide part starts as that very model
VECTORIZER = dict(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
SVC_C = 0.5
# NBSVM (fit_linear's nb): naive-Bayes smoothing and its own C, chosen on the built-in validation split (0.1 .. 1.0)
NB_ALPHA, NB_C = 1.0, 0.3
# Past this many training texts, the vocabulary and IDF are counted and the LinearSVC is fitted on an even sample
# of about this many, and the training rows are made per batch: their memory and time grow with the texts, and
# 200k (twice the built-in training split) is far more than the n-gram statistics need
FIT_TEXTS = 200_000


def sample_step(n: int, max_texts: int = FIT_TEXTS) -> int:
    """k for an even sample of about `max_texts` of `n` texts (every k-th); 1 (all) when they are fewer."""
    return max(1, -(-n // max_texts)) if max_texts else 1


class SparseRows:
    """Texts' TF-IDF rows in CSR form: 8 bytes a stored value, where a pair of arrays per text costs ~200 bytes
    more each. rows[i] -> (ids int64, values float32); rows[a:b] and rows.take(indices) -> a list of those."""

    def __init__(self, indptr: np.ndarray, ids: np.ndarray, values: np.ndarray):
        self.indptr, self.ids, self.values = indptr.astype(np.int64), ids.astype(np.int32), values.astype(np.float32)

    @classmethod
    def of(cls, rows) -> "SparseRows":
        rows = list(rows)
        return cls(np.cumsum([0] + [len(i) for i, _ in rows]),
                   np.concatenate([i for i, _ in rows]) if rows else np.zeros(0, np.int32),
                   np.concatenate([v for _, v in rows]) if rows else np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.ids[a:b].astype(np.int64), self.values[a:b]

    def take(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self[i] for i in indices]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def matrix(self, n_features: int):
        """A scipy CSR matrix (texts, n_features), what scikit-learn's linear models fit on."""
        from scipy.sparse import csr_matrix
        return csr_matrix((self.values, self.ids, self.indptr), shape=(len(self), n_features))


class TextRows:
    """Texts' TF-IDF rows made when asked, a batch at a time: a big training split's, which stored would take
    ~2 KB a text (1M texts of ~160 characters: ~2 GB). Same interface as SparseRows where the model reads it."""

    def __init__(self, features: "TfidfFeatures", texts: list[str]):
        self.features, self.texts = features, texts

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.features.row(self.texts[i]) for i in indices]


class TfidfFeatures:
    """A fitted TF-IDF vocabulary: n-gram -> column, and each column's IDF."""

    def __init__(self, vocab: list[str], idf: np.ndarray, ngram_range: tuple[int, int] = (1, 3)):
        if len(vocab) != len(idf):
            raise ValueError(f"{len(vocab)} n-grams but {len(idf)} IDF values")
        self.vocab, self.idf = list(vocab), np.asarray(idf, dtype=np.float64)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.index = {g: i for i, g in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def fit(cls, texts: list[str], max_texts: int = FIT_TEXTS) -> tuple["TfidfFeatures", SparseRows | TextRows]:
        """Vocabulary (VECTORIZER's n-grams in at least min_df texts) and IDF from `texts`, by scikit-learn ->
        (the features, the rows of all `texts`: scikit-learn's own, stored). Past `max_texts` texts both the
        counting and the stored rows would grow with the texts: the vocabulary and IDF come from every k-th
        text (about `max_texts` of them), and the rows are made a batch at a time (TextRows)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        vec = TfidfVectorizer(**VECTORIZER, dtype=np.float32)
        step = sample_step(len(texts), max_texts)
        if step > 1:
            vec.fit(texts[::step])
            features = cls(list(vec.get_feature_names_out()), vec.idf_, VECTORIZER["ngram_range"])
            return features, TextRows(features, texts)
        X = vec.fit_transform(texts)
        X.sort_indices()
        features = cls(list(vec.get_feature_names_out()), vec.idf_, VECTORIZER["ngram_range"])
        return features, SparseRows(X.indptr, X.indices, X.data)

    def grams(self, text: str):
        """The text's n-grams one by one, as scikit-learn's char analyzer makes them."""
        text = WHITESPACE.sub(" ", text.lower())
        lo, hi = self.ngram_range
        return (text[i:i + n] for n in range(lo, hi + 1) for i in range(len(text) - n + 1))

    def ngrams(self, text: str) -> Counter:
        return Counter(self.grams(text))

    def knows(self, text: str) -> bool:
        """Whether any n-gram of the text is in the vocabulary (it stops at the first one)."""
        return any(g in self.index for g in self.grams(text))

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One text -> (column ids int64, TF-IDF values float32), ids ascending; both empty when no n-gram of the
        text is in the vocabulary."""
        counts = self.ngrams(text)
        ids = np.fromiter(map(self.index.get, counts, repeat(-1)), np.int64, len(counts))  # -1: not in the vocabulary
        found = ids >= 0
        if not found.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids, counts = ids[found], np.fromiter(counts.values(), np.float64, len(counts))[found]
        order = np.argsort(ids)
        ids, values = ids[order], (1.0 + np.log(counts[order])) * self.idf[ids[order]]
        return ids, (values / np.linalg.norm(values)).astype(np.float32)

    def rows(self, texts: list[str]) -> SparseRows:
        return SparseRows.of(self.row(t) for t in texts)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "idf": torch.from_numpy(self.idf.astype(np.float32)),
                "ngram_range": list(self.ngram_range)}

    @classmethod
    def from_dict(cls, d: dict) -> "TfidfFeatures":
        idf = d["idf"].numpy() if isinstance(d["idf"], torch.Tensor) else np.asarray(d["idf"])
        return cls(d["vocab"], idf, tuple(d.get("ngram_range", (1, 3))))

    def to_json(self) -> dict:
        """For the ONNX file's metadata (plain JSON)."""
        return {"vocab": self.vocab, "idf": self.idf.astype(np.float32).tolist(), "ngram_range": list(self.ngram_range)}


def fit_wide(texts: list[str], labels: list[int], num_classes: int, fit: str, val: tuple[list[str], list[int]],
             cache: str | None = None):
    """The wide part of a fresh model, fitted on the training split -> (features, the split's rows, (weight,
    bias), the fit used). `fit`: "svm", "nbsvm" (fit_linear's nb), or "auto": both, and the one more accurate on
    the validation split `val` (texts, labels) is kept, the plain SVM on a tie. With `cache` (a .npz path named
    by what the fit depends on), read from there when a run already fitted it, else fitted and saved there: the
    vocabulary counting and the linear fit are most of a big table's start."""
    saved = read_cache(cache, "vocab", "idf", "ngram_range", "weight", "bias", "fit") if cache else None
    if saved:
        vocab, idf, ngram_range, weight, bias, used = saved
        features = TfidfFeatures(vocab.tolist(), idf, tuple(ngram_range))
        rows = features.rows(texts) if len(texts) <= FIT_TEXTS else TextRows(features, texts)
        return features, rows, (weight, bias), str(used)
    features, rows = TfidfFeatures.fit(texts)
    fits = {f: fit_linear(rows, labels, len(features), num_classes, nb=f == "nbsvm")
            for f in (("svm", "nbsvm") if fit == "auto" else (fit,))}
    if len(fits) > 1:
        X, y = features.rows(val[0]).matrix(len(features)), np.asarray(val[1])
        right = {f: int(((X @ w + b).argmax(1) == y).sum()) for f, (w, b) in fits.items()}
        used = max(fits, key=lambda f: (right[f], f == "svm"))
    else:
        used = fit
    weight, bias = fits[used]
    if cache:
        write_cache(cache, "the wide part", vocab=np.array(features.vocab, dtype=str), idf=features.idf,
                    weight=weight, bias=bias, ngram_range=np.array(features.ngram_range), fit=np.array(used))
    return features, rows, (weight, bias), used


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse rows -> (ids (B, F) int64, values (B, F) float32), F the longest row (at least 1), padding 0 / 0.0."""
    width = max([len(ids) for ids, _ in rows] + [1])
    ids = np.zeros((len(rows), width), np.int64)
    values = np.zeros((len(rows), width), np.float32)
    for r, (i, v) in enumerate(rows):
        ids[r, :len(i)], values[r, :len(v)] = i, v
    return torch.from_numpy(ids), torch.from_numpy(values)


def nb_ratios(X, y: np.ndarray, alpha: float = NB_ALPHA) -> np.ndarray:
    """Each feature's naive-Bayes log-count ratio for the texts where y is true against the rest (Wang & Manning
    2012): log of its share among the features present in the one, over its share in the other (counts + alpha)."""
    present = (X > 0).astype(np.float32)
    p = alpha + np.asarray(present[y].sum(0)).ravel()
    q = alpha + np.asarray(present[~y].sum(0)).ravel()
    return np.log((p / p.sum()) / (q / q.sum())).astype(np.float32)


def fit_linear(rows: SparseRows | TextRows, labels: list[int], n_features: int, num_classes: int, C: float = SVC_C,
               max_texts: int = FIT_TEXTS, nb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A LinearSVC (the TF-IDF baseline's, same C) fitted on the training rows (every k-th, about `max_texts`,
    when there are more) -> (weight (n_features, classes), bias (classes,)) as logits: for two classes the
    decision f becomes logits (-f/2, f/2), whose difference is f.

    With `nb`, NBSVM: one class against the rest at a time, the SVM (C=NB_C) is fitted on the features times the
    class's naive-Bayes ratios r, and w·(x∘r) = (w∘r)·x puts r back into the weights: the same features, so
    nothing else changes (checkpoint, ONNX, serving). liblinear's shuffling is seeded (random_state 0): the same
    rows give the same weights whatever the process did before (numpy's global generator is not seeded per run)."""
    from sklearn.svm import LinearSVC
    y = np.asarray(labels)
    step = sample_step(len(y), max_texts)
    if step > 1:  # liblinear copies the matrix as float64: a sample bounds its memory and time
        rows, y = SparseRows.of(rows.take(range(0, len(y), step))), y[::step]
    X = rows.matrix(n_features)
    if nb:
        fitted = []
        for c in ([1] if num_classes == 2 else range(num_classes)):
            r = nb_ratios(X, y == c)
            svc = LinearSVC(C=NB_C, random_state=0).fit(X.multiply(r).tocsr(), (y == c).astype(int))
            fitted.append((svc.coef_[0] * r, svc.intercept_[0]))
        coef = np.stack([w for w, _ in fitted]).astype(np.float32)
        intercept = np.array([b for _, b in fitted], np.float32)
    else:
        svc = LinearSVC(C=C, random_state=0).fit(X, y)
        coef, intercept = svc.coef_.astype(np.float32), svc.intercept_.astype(np.float32)
    if num_classes == 2:
        return np.stack([-coef[0] / 2, coef[0] / 2], 1), np.array([-intercept[0] / 2, intercept[0] / 2], np.float32)
    if coef.shape[0] != num_classes:  # a class absent from the training labels: keep the ones it fitted
        raise ValueError(f"the linear model fitted {coef.shape[0]} classes, the model has {num_classes}")
    return coef.T.copy(), intercept
