"""The sentiment-classification task: data -> tokenizer -> MiniBERT-MoE -> train/evaluate; infer, classify, compare."""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from tqdm import tqdm

import plots
from analyze import ANALYZE_TEXTS, Recorder
from api import field
from checkpoint import load_trained
from config import ENDLESS_EPOCHS, ModelConfig, Options, TrainConfig
from data import (DATASET_DIR, EXTRA_SENTIMENT, collate_cls, column, encode_texts, label_names,
                  length_bucketed_batches, mask_tokens, people_daily_paragraphs, read_table, read_text_lines,
                  reviews_splits, shipped_texts, texts_digest, tokenizer_cache, user_splits, with_extra_sentiment)
from distributed import is_main_process
from errors import DataError
from fsio import atomic_write_csv
from models import MaskedLM
from onnx_export import onnx_path, OnnxClassifier
from runtime import autocast
from shards import PACKED_MIN_TEXTS, packed
from task import Phase, Task, TaskData
from tokenizer import even_sample, load_or_train
from tracking import MetricsLog
from trainer import FitResult
from wide import FIT_TEXTS, NB_ALPHA, NB_C, SVC_C, VECTORIZER, TextRows, TfidfFeatures, fit_wide, sample_step

TRAIN_HINT = "python main.py --train --task cls"


# -----------------------------------------------------------------------------
# Data and evaluation

def load_splits(data: str | None, text_col: str, label_col: str, seed: int, quiet: bool, extra: bool = False):
    """--data's splits, or the built-in reviews (with `extra`, their training split joined by the other domains)."""
    if data:
        return user_splits(data, text_col, label_col, seed)
    splits = reviews_splits(quiet=quiet)
    return with_extra_sentiment(splits) if extra else splits


def pretrain_texts(splits: dict, cfg: TrainConfig) -> list[str]:
    """The masked-LM phase's texts: the training split, and with pretrain_shipped every review text the project
    ships, less any text of the val or test split (so pretraining never reads a held-out text)."""
    texts = splits["train"].text.tolist()
    if cfg.pretrain_shipped:
        seen = set(texts) | set(splits["val"].text) | set(splits["test"].text)
        texts += [t for t in dict.fromkeys(shipped_texts()) if t not in seen]
    return texts


def encode_split(tokenizer, df, names: list[str], where: str, features: TfidfFeatures | None, rows=None,
                 quiet: bool = True):
    """A split as (token ids, class indices, TF-IDF rows or None); `rows`: the split's rows when already made."""
    index = {n: i for i, n in enumerate(names)}
    texts, labels = df.text.tolist(), df.label.tolist()  # lists: iterating a Series costs ~1 µs an item
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} do not occur in the training split ({names})")
    if features is not None and rows is None:  # made per batch past FIT_TEXTS (a resumed big run's training split)
        rows = features.rows(texts) if len(texts) <= FIT_TEXTS else TextRows(features, texts)
    return packed(tokenizer, texts, quiet=quiet), [index[l] for l in labels], rows


def picked(rows, idx):
    return None if rows is None else rows.take(idx)


def scores(logits: np.ndarray, labels, prefix: str) -> dict:
    """Accuracy and macro-F1 of the logits' argmax, as {prefix}_acc, {prefix}_f1."""
    y, pred = np.asarray(labels), logits.argmax(1)
    return {f"{prefix}_acc": float(accuracy_score(y, pred)), f"{prefix}_f1": float(f1_score(y, pred, average="macro"))}


@torch.no_grad()
def evaluate(model, tokenizer, seqs, labels, wide_rows, cfg: ModelConfig, batch_size: int, device,
             dtype: str) -> dict:
    """Loss, accuracy, macro-F1; expert counts per MoE layer, and per true class (summed over layers).

    Batches are cut by length only, never by label: under expert choice (and a capacity limit) a text's routing
    depends on its batch-mates, so batching by class would let the label reach the prediction. The per-class
    counts come from each routed token's row (analyze.Recorder), whatever batch it is in. A wide & deep model's
    wide share of the logits comes back too ("_wide_logits"), for the blend on validation."""
    model.eval()
    num_classes = cfg.num_classes
    all_logits = np.zeros((len(seqs), num_classes), dtype=np.float32)
    wide_logits = np.zeros_like(all_logits) if wide_rows is not None else None
    loss_sum = 0.0
    layer_counts = class_counts = None
    recorder = Recorder(model) if cfg.num_experts else None
    try:
        for rows in length_bucketed_batches([len(s) for s in seqs], batch_size, None, shuffle=False):
            batch = collate_cls(tokenizer, [seqs[i] for i in rows], [labels[i] for i in rows], cfg.max_len, device,
                                picked(wide_rows, rows))
            with autocast(device, dtype):
                logits, _, info = model(**batch)
            loss_sum += float(info["ce"]) * len(rows)  # cross-entropy only: comparable with and without MoE
            all_logits[rows] = logits.float().cpu().numpy()
            if wide_logits is not None:
                wide_logits[rows] = info["wide_logits"].float().cpu().numpy()
            if recorder is None or not info["counts"]:
                continue
            counts = torch.stack(info["counts"]).cpu().numpy()  # (layers, E)
            if layer_counts is None:
                layer_counts = np.zeros_like(counts)
                class_counts = np.zeros((num_classes, counts.shape[1]), dtype=counts.dtype)
            layer_counts += counts
            row_class = np.asarray([labels[i] for i in rows])
            for _, _, chosen, routed, shape in recorder.take():
                # the batch row of each routed token (the pooled model routes one vector per text)
                row_of = (routed // shape[1] if len(shape) == 2 else routed).numpy()
                np.add.at(class_counts, row_class[row_of], chosen.numpy().astype(class_counts.dtype))
    finally:
        if recorder is not None:
            recorder.close()
    return {"val_loss": loss_sum / max(len(seqs), 1), **scores(all_logits, labels, "val"),
            "_layer_counts": layer_counts, "_class_counts": class_counts, "_logits": all_logits,
            "_wide_logits": wide_logits}


def batch_stream(tokenizer, seqs, labels, wide_rows, max_len: int, batch_size: int, seed: int, device):
    """Endless training batches: a fresh length-bucketed shuffle every epoch."""
    rng = random.Random(seed)
    lengths = [len(s) for s in seqs]
    while True:
        for idx in length_bucketed_batches(lengths, batch_size, rng):
            yield collate_cls(tokenizer, [seqs[i] for i in idx], [labels[i] for i in idx], max_len, device,
                              picked(wide_rows, idx))


def mlm_stream(tokenizer, seqs, max_len: int, batch_size: int, seed: int, device):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lengths = [len(s) for s in seqs]
    while True:
        for idx in length_bucketed_batches(lengths, batch_size, rng):
            batch = collate_cls(tokenizer, [seqs[i] for i in idx], None, max_len, device)
            yield mask_tokens(batch, tokenizer, gen)


@torch.no_grad()
def evaluate_mlm(model, tokenizer, seqs, max_len: int, batch_size: int, device, dtype: str) -> dict:
    """Masked-LM loss on held-out texts, with a fixed masking so evaluations compare."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for idx in length_bucketed_batches([len(s) for s in seqs], batch_size, None, shuffle=False):
        batch = mask_tokens(collate_cls(tokenizer, [seqs[i] for i in idx], None, max_len, device), tokenizer, gen)
        with autocast(device, dtype):
            _, _, info = model(**batch)
        n = int((batch["labels"] != -100).sum())
        total, count = total + float(info["ce"]) * n, count + n
    return {"val_loss": total / max(count, 1)}


def pretrain_phase(model, tokenizer, texts: list[str], val_texts: list[str], model_cfg: ModelConfig,
                   train_cfg: TrainConfig, opts: Options, device, resume: bool) -> Phase:
    """Phase 1 of --train when pretrain_epochs > 0: masked-LM on unlabelled text (until pretrain_steps, or the
    epochs, or the seconds end); the encoder it trains is the classifier's."""
    if train_cfg.pretrain_news:
        texts = texts + people_daily_paragraphs()
    seqs = packed(tokenizer, texts, model_cfg.max_len - 2, quiet=opts.quiet)
    val_seqs = encode_texts(tokenizer, val_texts)
    cfg = replace(train_cfg, epochs=train_cfg.pretrain_epochs, time_budget=train_cfg.pretrain_seconds,
                  max_steps=train_cfg.pretrain_steps, lr=train_cfg.pretrain_lr or train_cfg.lr, label_smoothing=0.0,
                  optimizer=train_cfg.pretrain_optimizer or train_cfg.optimizer)
    steps_per_epoch = -(-len(seqs) // (cfg.batch_size * cfg.accum_steps))
    cfg = replace(cfg, eval_every=min(steps_per_epoch, 500))
    if not opts.quiet:
        corpus = " + ".join(["training texts"] + ["shipped reviews"] * train_cfg.pretrain_shipped
                            + ["People's Daily"] * train_cfg.pretrain_news)
        limits = []
        if cfg.max_steps:
            limits.append(f"{cfg.max_steps} steps")
        elif cfg.epochs < ENDLESS_EPOCHS:  # endless epochs: the seconds alone end the phase
            limits.append(f"{cfg.epochs} epoch(s)")
        if cfg.time_budget:
            limits.append(f"at most {cfg.time_budget:.0f} s")
        print(f"phase 1: masked-LM pretraining on {len(seqs):,} sequences ({corpus}) for {', '.join(limits)}",
              file=sys.stderr)
    mlm = MaskedLM(model)
    log = MetricsLog(os.path.join(opts.out_dir, "pretrain_metrics.jsonl") if is_main_process() else None,
                     append=resume)

    def finish(result: FitResult) -> dict:
        if is_main_process() and not result.halted:
            plots.loss_curve(log.rows, os.path.join(opts.out_dir, "pretrain_loss_curve.png"), "masked-LM pretraining")
            if not opts.quiet:
                print("phase 2: fine-tuning on the labelled training split", file=sys.stderr)
        return {"pretrain_steps": result.steps, "pretrain_seconds": round(result.train_seconds, 3),
                "pretrain_val_loss": result.best.get("val_loss")}

    return Phase(mlm, cfg, steps_per_epoch, mlm_stream(tokenizer, seqs, model_cfg.max_len, cfg.batch_size, cfg.seed,
                                                      device),
                 lambda: evaluate_mlm(mlm, tokenizer, val_seqs, model_cfg.max_len, cfg.batch_size * 2, device,
                                      cfg.dtype),
                 "-val_loss", log, finish)


# -----------------------------------------------------------------------------
# Calibration: one temperature for the logits, and the confidence below which an answer is marked unsure

CONFIDENT_ACCURACY = 0.95  # answers at or above the unsure threshold are right this often on validation


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017), by a
    fine grid over log T: one parameter, so a grid is exact enough and cannot diverge."""
    return temperature_nll(logits, labels)[0]


def temperature_nll(logits: np.ndarray, labels, chunk: int = 64) -> tuple[float, float]:
    """(fit_temperature's T, the mean NLL at it); the grid's temperatures `chunk` at a time, each as one array
    operation over all the texts."""
    y = np.asarray(labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 801))
    picked = logits[np.arange(len(y)), y]
    nll = []
    for i in range(0, len(grid), chunk):
        z = logits[None] / grid[i:i + chunk, None, None]  # (temperatures, texts, classes)
        top = z.max(-1)
        lse = top + np.log(np.exp(z - top[..., None]).sum(-1))
        nll.append((lse - picked[None] / grid[i:i + chunk, None]).mean(1))
    nll = np.concatenate(nll)
    best = int(np.argmin(nll))
    return float(grid[best]), float(nll[best])


def expected_calibration_error(probs: np.ndarray, labels, bins: int = 15) -> float:
    """ECE: the gap between confidence (max probability) and accuracy, averaged over equal-width confidence bins
    weighted by their share of the texts."""
    conf, right = probs.max(1), probs.argmax(1) == np.asarray(labels)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(conf[which == b].mean() - right[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def unsure_threshold(probs: np.ndarray, labels, target: float = CONFIDENT_ACCURACY) -> float:
    """The lowest confidence t such that the validation answers with max probability >= t are right at least
    `target` of the time (1.0 when no threshold reaches it: every answer is then marked unsure)."""
    conf, right = probs.max(1), probs.argmax(1) == np.asarray(labels)
    order = np.argsort(-conf)
    accuracy_above = np.cumsum(right[order]) / np.arange(1, len(order) + 1)  # accuracy of the k most confident
    ok = np.flatnonzero(accuracy_above >= target)
    return float(conf[order][ok[-1]]) if len(ok) else 1.0


def blend_deep(val: dict, labels, factors=np.linspace(0.0, 4.0, 41)) -> float:
    """Wide & deep: the factor on the deep part's share of the logits (deep_scale times it) chosen on
    validation: of the factors whose validation accuracy is at least the wide part's alone (factor 0), the one
    whose temperature-scaled logits have the lowest validation NLL. So the model is never worse than its
    linear model on validation, and the blend is fitted on texts the deep part did not train on."""
    y = np.asarray(labels)
    wide, deep = val["_wide_logits"], val["_logits"] - val["_wide_logits"]
    floor = (wide.argmax(1) == y).mean()
    best = (np.inf, 0.0)
    for f in factors:
        z = wide + f * deep
        if (z.argmax(1) == y).mean() < floor:
            continue
        best = min(best, (temperature_nll(z, y)[1], float(f)))
    return best[1]


def blended(split: dict, factor: float) -> dict:
    """A split's evaluation with the deep share of its logits times `factor`."""
    return {**split, "_logits": split["_wide_logits"] + factor * (split["_logits"] - split["_wide_logits"])}


def calibrate(val: dict, val_labels, test: dict, test_labels) -> tuple[dict, dict]:
    """(what the checkpoint keeps: temperature and unsure threshold, fitted on validation; the test metrics: ECE
    before and after, and the share of test texts marked unsure)."""
    temperature = fit_temperature(val["_logits"], val_labels)
    threshold = unsure_threshold(softmax(val["_logits"], temperature), val_labels)
    test_probs = softmax(test["_logits"], temperature)
    return ({"temperature": temperature, "unsure_below": threshold},
            {"test_ece_raw": expected_calibration_error(softmax(test["_logits"]), test_labels),
             "test_ece": expected_calibration_error(test_probs, test_labels),
             "test_unsure_share": float((test_probs.max(1) < threshold).mean())})


# -----------------------------------------------------------------------------
# Using a trained classifier

class Predictor:
    """A trained classifier ready for batches of raw text: tokenizer + label names + a PyTorch model, or with
    backend="onnx" its exported ONNX file (<checkpoint>.onnx) on one reused ONNX Runtime session. Probabilities
    are calibrated (the temperature fitted on validation) and an answer below the validation-chosen confidence is
    marked unsure (checkpoints from before calibration: temperature 1, never unsure)."""

    def __init__(self, path: str, device, backend: str = "torch"):
        self.device, self.backend = device, backend
        if backend == "onnx":
            self.session = OnnxClassifier(onnx_path(path))
            self.tokenizer, self.names, self.max_len = (self.session.tokenizer, self.session.names,
                                                        self.session.max_len)
            self.device, calibration = torch.device("cpu"), self.session.calibration
            self.features = self.session.features
        else:
            self.model, self.tokenizer, ckpt = load_trained(path, "cls", TRAIN_HINT, device)
            self.max_len = self.model.config.max_len
            self.names = list(ckpt["label_names"])
            self.dtype = ckpt["train_config"].get("dtype", "fp32")
            calibration = ckpt.get("calibration", {})
            self.features = getattr(self.model, "features", None)
        self.temperature = float(calibration.get("temperature", 1.0))
        self.unsure_below = float(calibration.get("unsure_below", 0.0))

    @torch.inference_mode()
    def logits(self, batch: dict) -> np.ndarray:
        """A batch from data.collate_cls -> logits (B, classes)."""
        if self.backend == "onnx":
            return self.session.logits(batch)
        with autocast(self.device, self.dtype):
            return self.model(**batch)[0].float().cpu().numpy()

    def predict(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities (len(texts), classes), in input order."""
        seqs = encode_texts(self.tokenizer, texts)
        rows = self.features.rows(texts) if self.features else None
        probs = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        batches = length_bucketed_batches([len(s) for s in seqs], batch_size, None, shuffle=False)
        for idx in tqdm(batches, desc="classify", unit="batch", disable=not progress):
            batch = collate_cls(self.tokenizer, [seqs[i] for i in idx], None, self.max_len, self.device,
                                picked(rows, idx))
            probs[idx] = softmax(self.logits(batch), self.temperature)
        return probs

    def unsure(self, probs: np.ndarray, texts: list[str]) -> np.ndarray:
        """Class probabilities (texts, classes) -> whether each answer is unsure: below the unsure threshold, or
        (wide & deep) not one n-gram of its text is in the linear part's vocabulary, so that the answer rests on
        the deep part alone, which validation never checked on its own."""
        low = probs.max(-1) < self.unsure_below
        if self.features is None:
            return low
        return low | ~np.array([self.features.knows(t) for t in texts], dtype=bool)

    def answer(self, probs: np.ndarray, text: str) -> dict:
        """One text's class probabilities -> {label, probs, unsure}."""
        return {"label": self.names[int(probs.argmax())], "probs": {n: float(v) for n, v in zip(self.names, probs)},
                "unsure": bool(self.unsure(probs[None], [text])[0])}


# -----------------------------------------------------------------------------
# Dense vs MoE at equal active parameters, and the TF-IDF baseline, on the same split

def tfidf_model(train, max_texts: int = FIT_TEXTS):
    """TF-IDF over character 1-3-grams + LinearSVC, fit on a text/label frame (on every k-th row, about
    `max_texts` of them, past that: the wide part's sample): the linear baseline."""
    train = train.iloc[::sample_step(len(train), max_texts)]
    return make_pipeline(TfidfVectorizer(**VECTORIZER), LinearSVC(C=SVC_C, random_state=0)).fit(train.text, train.label)


def tfidf_baseline(splits) -> dict:
    """The linear baseline fit on train (fit_rows: the rows it was fitted on), scored on val and test."""
    t0 = time.time()
    clf = tfidf_model(splits["train"])
    fit_rows = len(range(0, len(splits["train"]), sample_step(len(splits["train"]))))
    out = {"train_seconds": time.time() - t0, "fit_rows": fit_rows}
    for s in ("val", "test"):
        pred = clf.predict(splits[s].text)
        out[f"{s}_acc"] = float(accuracy_score(splits[s].label, pred))
        out[f"{s}_f1"] = float(f1_score(splits[s].label, pred, average="macro"))
    return out


# -----------------------------------------------------------------------------
# The task

class ClsData(TaskData):
    """Each split as token ids, class indices and, for a wide & deep model, TF-IDF rows. The TF-IDF vocabulary
    is fitted on the training split (a resumed or upcycled run keeps its checkpoint's)."""

    def __init__(self, tokenizer, splits: dict, model_cfg: ModelConfig, where: str, start=None, quiet: bool = True):
        self.tokenizer, self.splits, self.cfg = tokenizer, splits, model_cfg
        self.names = label_names(splits["train"].label)
        if start and start[1].get("label_names") != self.names:  # resumed or upcycled: the same classes
            raise DataError(f"{start[0]}: the data's classes {self.names} are not those of the model it starts "
                            f"from ({start[1].get('label_names')}); use the same --data")
        self.features, self.linear, self.wide_fit, rows = None, None, None, {}
        if model_cfg.wide:
            saved = start[1].get("wide_features") if start else None
            if saved:
                self.features = TfidfFeatures.from_dict(saved)
            else:  # a fresh model: its wide part is fitted here (init_model sets it)
                self.features, rows["train"], self.linear, self.wide_fit = self.fit_wide(splits["train"],
                                                                                          splits["val"])
        self.encoded = {s: encode_split(tokenizer, df, self.names, f"{where} [{s}]", self.features, rows.get(s), quiet)
                        for s, df in splits.items()}

    def fit_wide(self, train, val):
        """wide.fit_wide on the training split (auto: chosen on `val`); saved under dataset/prepared/ (named by
        the texts, the labels and the fit) when the split is as big as shards.packed saves (so tiny test splits
        write nothing)."""
        index = {n: i for i, n in enumerate(self.names)}
        texts, labels = train.text.tolist(), [index[l] for l in train.label.tolist()]
        val_texts, val_labels = val.text.tolist(), [index.get(l, -1) for l in val.label.tolist()]  # -1: only in val
        cache = None
        if len(texts) >= PACKED_MIN_TEXTS:
            how = json.dumps([self.cfg.wide_fit, VECTORIZER, SVC_C, NB_C, NB_ALPHA, FIT_TEXTS])
            digests = " ".join(texts_digest(map(str, part)) for part in (texts, labels, val_texts, val_labels))
            key = hashlib.sha256(f"{digests} {how}".encode()).hexdigest()
            cache = os.path.join(DATASET_DIR, "prepared", f"wide_{key[:32]}.npz")
        return fit_wide(texts, labels, len(self.names), self.cfg.wide_fit, (val_texts, val_labels), cache)

    def sized(self, model_cfg: ModelConfig) -> ModelConfig:
        return replace(model_cfg, wide_vocab=len(self.features)) if self.features else model_cfg

    def init_model(self, model) -> None:
        """A fresh wide & deep model's wide part: the linear model fitted on the training split's TF-IDF rows."""
        if self.linear is None:
            return
        weight, bias = self.linear
        with torch.no_grad():
            model.wide.weight.copy_(torch.from_numpy(weight))
            model.wide_bias.copy_(torch.from_numpy(bias))

    def describe(self) -> str:
        sizes = "/".join(str(len(self.encoded[s][0])) for s in ("train", "val", "test"))
        wide = f"; wide part: {self.wide_fit}" if self.wide_fit else ""
        return f"classes {self.names}; train/val/test {sizes}{wide}"

    def extra(self) -> dict:
        return {"label_names": self.names, **({"wide_features": self.features.to_dict()} if self.features else {}),
                **({"wide_fit": self.wide_fit} if self.wide_fit else {})}

    def steps_per_epoch(self, cfg: TrainConfig) -> int:
        return -(-len(self.encoded["train"][0]) // (cfg.batch_size * cfg.accum_steps))

    def batches(self, cfg: TrainConfig, device):
        return batch_stream(self.tokenizer, *self.encoded["train"], self.cfg.max_len, cfg.batch_size, cfg.seed,
                            device)

    def evaluate(self, model, split: str, cfg: TrainConfig, device) -> dict:
        return evaluate(model, self.tokenizer, *self.encoded[split], self.cfg, cfg.batch_size * 2, device, cfg.dtype)

    def calibrate(self, model, test: dict, cfg: TrainConfig, device) -> tuple[dict, dict]:
        """Wide & deep: the deep part's weight blended on validation (blend_deep; it goes into the weights), the
        test split rescored with it, and each part alone scored on test. Then temperature and unsure threshold
        from the validation split's logits; ECE on test before and after."""
        val = self.evaluate(model, "val", cfg, device)
        val_labels, test_labels = self.encoded["val"][1], self.encoded["test"][1]
        kept, parts = {}, {}
        if val["_wide_logits"] is not None:
            factor = blend_deep(val, val_labels)
            deep_sign = 1.0 if float(model.deep_scale.detach()) >= 0 else -1.0
            parts = {"deep_blend": factor, **scores(test["_wide_logits"], test_labels, "test_wide"),
                     **scores(deep_sign * (test["_logits"] - test["_wide_logits"]), test_labels, "test_deep")}
            with torch.no_grad():
                model.deep_scale.mul_(factor)
            kept["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            val, test = blended(val, factor), blended(test, factor)
            parts.update({**scores(val["_logits"], val_labels, "val"), **scores(test["_logits"], test_labels, "test")})
        calibration, metrics = calibrate(val, val_labels, test, test_labels)
        return {**kept, "calibration": calibration}, {**parts, **metrics}

    def report(self, model, rows: list[dict], test: dict, out_dir: str) -> dict:
        kind = "dense" if not model.config.num_experts else "MoE"
        loss_png = plots.loss_curve(rows, os.path.join(out_dir, "loss_curve.png"), f"MoE classifier ({kind})")
        heat_png = None
        if test["_layer_counts"] is not None:
            heat_png = plots.expert_heatmap(test["_layer_counts"], os.path.join(out_dir, "expert_heatmap.png"),
                                            test["_class_counts"], self.names, title="test split")
        return {"loss_curve": loss_png, "expert_heatmap": heat_png}


class ClsTask(Task):
    name, train_hint, select = "cls", TRAIN_HINT, "val_f1"
    metrics = ("val_acc", "val_f1", "test_acc", "test_f1", "test_ece_raw", "test_ece", "test_wide_acc",
               "test_deep_acc", "deep_blend")
    modes = ("infer", "classify")
    route = "/api/classify"
    request_fields = {"text": "string"}

    def splits(self, opts: Options, train_cfg: TrainConfig) -> dict:
        return load_splits(opts.data, opts.text_col, opts.label_col, train_cfg.seed, opts.quiet,
                           train_cfg.extra_labelled)

    def new_tokenizer(self, opts: Options, train_cfg: TrainConfig, model_cfg: ModelConfig, splits: dict):
        corpus = "+".join(["reviews"] + [name.split(".")[0] for name in EXTRA_SENTIMENT] * train_cfg.extra_labelled)
        texts = even_sample(splits["train"].text.tolist(), train_cfg.tokenizer_sample_mb)
        cache = tokenizer_cache(None if opts.data else corpus, train_cfg.tokenizer, model_cfg.vocab_size, texts)
        return load_or_train(train_cfg.tokenizer, texts, model_cfg.vocab_size, cache, progress=not opts.quiet)

    def sized(self, model_cfg: ModelConfig, tokenizer, splits: dict) -> ModelConfig:
        return replace(model_cfg, vocab_size=tokenizer.n_vocab, num_classes=len(label_names(splits["train"].label)))

    def data(self, tokenizer, splits: dict, model_cfg: ModelConfig, opts: Options, start=None) -> ClsData:
        return ClsData(tokenizer, splits, model_cfg, opts.data or "reviews", start, opts.quiet)

    def phases(self, train_cfg: TrainConfig) -> list[str]:
        return ["pretrain"] if train_cfg.pretrain_epochs else []

    def phase(self, name: str, model, data: ClsData, train_cfg: TrainConfig, opts: Options, device,
              resume: bool) -> Phase:
        return pretrain_phase(model, data.tokenizer, pretrain_texts(data.splits, train_cfg),
                              data.splits["val"].text.tolist(), data.cfg, train_cfg, opts, device, resume)

    def baselines(self, opts: Options, train_cfg: TrainConfig) -> dict:
        """The linear baseline of --compare, on the same split."""
        return {"tfidf_svm": tfidf_baseline(load_splits(opts.data, opts.text_col, opts.label_col, train_cfg.seed,
                                                        True, train_cfg.extra_labelled))}

    def infer(self, opts: Options, device) -> dict:
        text = opts.text
        if text is None or not text.strip():
            raise DataError("--text: empty text; give a sentence to classify, e.g. --text \"我爱编程\"")
        p = Predictor(opts.checkpoint, device, opts.backend)
        n_tokens = len(p.tokenizer.encode(text))
        if n_tokens > p.max_len - 2:
            print(f"note: text is {n_tokens} tokens; only the first {p.max_len - 2} are used", file=sys.stderr)
        return {**p.answer(p.predict([text])[0], text), "unsure_below": p.unsure_below}

    def classify(self, opts: Options, device) -> dict:
        """Label every row of --input; with a label column, also score the predictions."""
        if not opts.input:
            raise DataError("--classify needs --input FILE")
        df = read_table(opts.input)
        texts = [str(t) for t in column(df, opts.text_col, opts.input)]
        p = Predictor(opts.checkpoint, device, opts.backend)
        probs = p.predict(texts, progress=not opts.quiet)
        out = df.copy()
        out["pred"] = [p.names[i] for i in probs.argmax(1)]
        out["unsure"] = p.unsure(probs, texts)
        for j, n in enumerate(p.names):
            out[f"prob_{n}"] = probs[:, j]
        output = opts.output or os.path.join(opts.out_dir, "predictions.csv")
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        atomic_write_csv(out, output)
        summary = {"input": opts.input, "output": output, "rows": len(out)}
        if opts.label_col in df.columns:
            truth = [str(l).strip() for l in df[opts.label_col]]
            labels = p.names + sorted(set(truth) - set(p.names))
            summary["accuracy"] = float(accuracy_score(truth, out["pred"]))
            summary["macro_f1"] = float(f1_score(truth, out["pred"], average="macro", labels=labels, zero_division=0))
            print(classification_report(truth, out["pred"], labels=labels, zero_division=0, digits=4),
                  file=sys.stderr)
            cm = confusion_matrix(truth, out["pred"], labels=labels)
            os.makedirs(opts.out_dir, exist_ok=True)  # --output may have put the predictions elsewhere
            summary["confusion_matrix"] = plots.confusion_matrix_png(
                cm, labels, os.path.join(opts.out_dir, "confusion_matrix.png"), f"confusion matrix: {opts.input}")
        return summary

    def show(self, mode: str, result: dict, opts: Options) -> None:
        if mode != "infer" or opts.json:
            return super().show(mode, result, opts)
        unsure = (f"  (unsure: below the {result['unsure_below']:.2f} confidence at which validation answers "
                  f"are right {CONFIDENT_ACCURACY:.0%} of the time)" if result["unsure"] else "")
        print(f"label: {result['label']}{unsure}")
        for name, prob in sorted(result["probs"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<12} {prob:.4f}")

    # ---- --analyze
    def analysis_texts(self, opts: Options, model, tokenizer, device) -> list:
        if opts.input:
            return read_text_lines(opts.input, opts.text_col)
        return list(reviews_splits(quiet=True)["test"].text[:ANALYZE_TEXTS])

    def analysis_batches(self, model, tokenizer, texts: list, device, batch_size: int = 64):
        seqs = encode_texts(tokenizer, texts)
        features = getattr(model, "features", None)  # a wide & deep model: its prediction needs the TF-IDF rows
        rows = features.rows(texts) if features else None
        for i in range(0, len(seqs), batch_size):
            batch = collate_cls(tokenizer, seqs[i:i + batch_size], None, model.config.max_len, device,
                                rows[i:i + batch_size] if rows is not None else None)
            inputs = ("input_ids", "attention_mask") + (("wide_ids", "wide_values") if rows is not None else ())
            yield tuple(batch[k] for k in inputs), {"": batch["input_ids"]}

    # ---- --export onnx
    def export_inputs(self, ids, config=None) -> tuple[tuple, list[str]]:
        mask = torch.ones_like(ids)
        mask[-1, -min(3, ids.size(1) - 1):] = 0  # a padded row, so the mask input is not constant
        if not (config and config.wide_vocab):
            return (ids, mask), ["input_ids", "attention_mask"]
        # TF-IDF rows of another width than T (their own dynamic axis), the last row padded like the mask
        gen = torch.Generator().manual_seed(ids.size(0) * 1000 + ids.size(1))
        wide_ids = torch.randint(0, config.wide_vocab, (ids.size(0), ids.size(1) + 3), generator=gen)
        wide_values = torch.rand(wide_ids.shape, generator=gen)
        wide_ids[-1, -2:], wide_values[-1, -2:] = 0, 0.0
        return (ids, mask, wide_ids, wide_values), ["input_ids", "attention_mask", "wide_ids", "wide_values"]

    # ---- --serve
    def serve_load(self, path: str, device):
        return Predictor(path, device)

    def serve_status(self, loaded) -> dict:
        return {"labels": loaded.names}

    def serve_model(self, loaded):
        return loaded.model, loaded.tokenizer

    def answer(self, loaded, req: dict, device) -> dict:
        text = field(req, "text", str)
        answer = loaded.answer(loaded.predict([text])[0], text)
        return {**answer, "probs": {n: round(p, 6) for n, p in answer["probs"].items()}}


TASK = ClsTask()
