"""The sentiment-classification task: data -> tokenizer -> MiniBERT-MoE -> train/evaluate; infer, classify, compare."""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import replace

import numpy as np
import torch

import plots
from data import (DataError, atomic_write_csv, collate_cls, column, encode_texts,
                  length_bucketed_batches, label_names, read_table, reviews_splits, tokenizer_cache, user_splits)
from models import ModelConfig
from tokenizer import load_or_train
from checkpoint import last_path, load_trained
from trainer import MetricsLog, TrainConfig, autocast, fit, is_main_process

TRAIN_HINT = "python main.py --train --task cls"


# -----------------------------------------------------------------------------
# Data and evaluation

def load_splits(data: str | None, text_col: str, label_col: str, seed: int, quiet: bool):
    if data:
        return user_splits(data, text_col, label_col, seed)
    return reviews_splits(quiet=quiet)


def encode_split(tokenizer, df, names: list[str], where: str):
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(df.label) - set(index))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} do not occur in the training split ({names})")
    return encode_texts(tokenizer, list(df.text)), [index[l] for l in df.label]


@torch.no_grad()
def evaluate(model, tokenizer, seqs, labels, cfg: ModelConfig, batch_size: int, device, dtype: str) -> dict:
    """Loss, accuracy, macro-F1; expert counts per MoE layer and per true class (summed over layers)."""
    from sklearn.metrics import accuracy_score, f1_score
    model.eval()
    num_classes = cfg.num_classes
    preds = np.zeros(len(seqs), dtype=int)
    loss_sum = 0.0
    layer_counts = class_counts = None
    for c in range(num_classes):  # one class at a time, so routing statistics can be kept per class
        idx = [i for i, l in enumerate(labels) if l == c]
        for batch_idx in length_bucketed_batches([len(seqs[i]) for i in idx], batch_size, None, shuffle=False):
            rows = [idx[j] for j in batch_idx]
            batch = collate_cls(tokenizer, [seqs[i] for i in rows], [labels[i] for i in rows], cfg.max_len, device)
            with autocast(device, dtype):
                logits, _, info = model(**batch)
            loss_sum += float(info["ce"]) * len(rows)  # cross-entropy only: comparable with and without MoE
            preds[rows] = logits.argmax(-1).cpu().numpy()
            if info["counts"]:
                counts = torch.stack(info["counts"]).cpu().numpy()  # (layers, E)
                if layer_counts is None:
                    layer_counts = np.zeros_like(counts)
                    class_counts = np.zeros((num_classes, counts.shape[1]), dtype=counts.dtype)
                layer_counts += counts
                class_counts[c] += counts.sum(0)
    y = np.asarray(labels)
    return {"val_loss": loss_sum / max(len(seqs), 1), "val_acc": float(accuracy_score(y, preds)),
            "val_f1": float(f1_score(y, preds, average="macro")),
            "_layer_counts": layer_counts, "_class_counts": class_counts}


def batch_stream(tokenizer, seqs, labels, max_len: int, batch_size: int, seed: int, device):
    """Endless training batches: a fresh length-bucketed shuffle every epoch."""
    rng = random.Random(seed)
    lengths = [len(s) for s in seqs]
    while True:
        for idx in length_bucketed_batches(lengths, batch_size, rng):
            yield collate_cls(tokenizer, [seqs[i] for i in idx], [labels[i] for i in idx], max_len, device)


def mlm_stream(tokenizer, seqs, max_len: int, batch_size: int, seed: int, device):
    import torch
    from data import mask_tokens
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lengths = [len(s) for s in seqs]
    while True:
        for idx in length_bucketed_batches(lengths, batch_size, rng):
            batch = collate_cls(tokenizer, [seqs[i] for i in idx], None, max_len, device)
            yield mask_tokens(batch, tokenizer, gen)


@torch.no_grad()
def evaluate_mlm(model, tokenizer, seqs, max_len: int, batch_size: int, device, dtype: str) -> dict:
    """Masked-LM loss on held-out texts, with a fixed masking so evaluations compare."""
    from data import mask_tokens
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


def pretrain(model, tokenizer, texts: list[str], val_texts: list[str], model_cfg: ModelConfig,
             train_cfg: TrainConfig, out_dir: str, device, quiet: bool,
             last: tuple | None = None, resume: dict | None = None) -> dict:
    """Phase 1 of --train when pretrain_epochs > 0: masked-LM on unlabelled text (until pretrain_steps, or the
    epochs, or the seconds end). `last` = (path, payload(model, metrics)) for the resume state, as in fit."""
    from data import people_daily_paragraphs, windows
    from models import MaskedLM
    if train_cfg.pretrain_news:
        texts = texts + people_daily_paragraphs()
    seqs = windows(encode_texts(tokenizer, texts), model_cfg.max_len - 2)
    val_seqs = encode_texts(tokenizer, val_texts)
    cfg = replace(train_cfg, epochs=train_cfg.pretrain_epochs, time_budget=train_cfg.pretrain_seconds,
                  max_steps=train_cfg.pretrain_steps, lr=train_cfg.pretrain_lr or train_cfg.lr, label_smoothing=0.0,
                  optimizer=train_cfg.pretrain_optimizer or train_cfg.optimizer)
    steps_per_epoch = -(-len(seqs) // (cfg.batch_size * cfg.accum_steps))
    cfg = replace(cfg, eval_every=min(steps_per_epoch, 500))
    if not quiet:
        corpus = "training texts + People's Daily" if train_cfg.pretrain_news else "training texts"
        until = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs} epoch(s)"
        cap = f", at most {cfg.time_budget:.0f} s" if cfg.time_budget else ""
        print(f"phase 1: masked-LM pretraining on {len(seqs):,} sequences ({corpus}) for {until}{cap}",
              file=sys.stderr)
    mlm = MaskedLM(model)
    log = MetricsLog(os.path.join(out_dir, "pretrain_metrics.jsonl") if is_main_process() else None,
                     append=resume is not None)
    result = fit(mlm, cfg, mlm_stream(tokenizer, seqs, model_cfg.max_len, cfg.batch_size, cfg.seed, device),
                 steps_per_epoch,
                 evaluate=lambda: evaluate_mlm(mlm, tokenizer, val_seqs, model_cfg.max_len, cfg.batch_size * 2,
                                               device, cfg.dtype),
                 select="-val_loss", on_best=lambda m: None, device=device, log=log, quiet=quiet,
                 last=last and (last[0], lambda m: last[1](mlm, m)), resume=resume)
    if is_main_process() and not result["halted"]:
        plots.loss_curve(log.rows, os.path.join(out_dir, "pretrain_loss_curve.png"), "masked-LM pretraining")
    return {"pretrain_steps": result["steps"], "pretrain_seconds": round(result["train_seconds"], 3),
            "pretrain_val_loss": result.get("val_loss"), "_halted": result["halted"]}


# -----------------------------------------------------------------------------
# The task interface (pipeline.py)

NAME, SELECT = "cls", "val_f1"
METRICS = ("val_acc", "val_f1", "test_acc", "test_f1")


def splits(args, train_cfg: TrainConfig) -> dict:
    return load_splits(args.data, args.text_col, args.label_col, train_cfg.seed, args.quiet)


def new_tokenizer(args, train_cfg: TrainConfig, model_cfg: ModelConfig, splits: dict):
    cache = None if args.data else tokenizer_cache("reviews", train_cfg.tokenizer, model_cfg.vocab_size)
    return load_or_train(train_cfg.tokenizer, list(splits["train"].text), model_cfg.vocab_size, cache,
                         progress=not args.quiet)


def sized(model_cfg: ModelConfig, tokenizer, splits: dict) -> ModelConfig:
    return replace(model_cfg, vocab_size=tokenizer.n_vocab, num_classes=len(label_names(splits["train"].label)))


class Data:
    """Each split as token ids and class indices. Training has two phases when pretrain_epochs > 0: masked-LM
    pretraining of the encoder on unlabelled text (pretrain), then fine-tuning on the labels. The resume state
    (<checkpoint>.last.pt) says which phase it was saved in."""

    def __init__(self, tokenizer, splits: dict, model_cfg: ModelConfig, args, start=None):
        self.tokenizer, self.splits, self.cfg = tokenizer, splits, model_cfg
        self.names = label_names(splits["train"].label)
        if start and start[1].get("label_names") != self.names:  # resumed or upcycled: the same classes
            raise DataError(f"{start[0]}: the data's classes {self.names} are not those of the model it starts "
                            f"from ({start[1].get('label_names')}); use the same --data")
        self.encoded = {s: encode_split(tokenizer, df, self.names, f"{args.data or 'reviews'} [{s}]")
                        for s, df in splits.items()}

    def describe(self) -> str:
        sizes = "/".join(str(len(self.encoded[s][0])) for s in ("train", "val", "test"))
        return f"classes {self.names}; train/val/test {sizes}"

    def extra(self) -> dict:
        return {"label_names": self.names}

    def steps_per_epoch(self, cfg: TrainConfig) -> int:
        return -(-len(self.encoded["train"][0]) // (cfg.batch_size * cfg.accum_steps))

    def batches(self, cfg: TrainConfig, device):
        return batch_stream(self.tokenizer, *self.encoded["train"], self.cfg.max_len, cfg.batch_size, cfg.seed,
                            device)

    def evaluate(self, model, split: str, cfg: TrainConfig, device) -> dict:
        return evaluate(model, self.tokenizer, *self.encoded[split], self.cfg, cfg.batch_size * 2, device, cfg.dtype)

    def pretrain(self, model, cfg: TrainConfig, args, device, payload, resume) -> tuple[dict, dict | None]:
        """Phase 1, unless the run resumes in phase 2: (its summary with "_halted", the resume state of phase 2)."""
        phase = resume["saved"].get("phase") if resume else None
        if phase == "finetune":
            return {**resume["saved"].get("phase1", {}), "_halted": False}, resume
        if not cfg.pretrain_epochs:
            return {"_halted": False}, resume
        phase1 = pretrain(model, self.tokenizer, list(self.splits["train"].text), list(self.splits["val"].text),
                          self.cfg, cfg, args.out_dir, device, args.quiet,
                          last=(last_path(args.checkpoint), lambda net, m: payload(m, net=net, phase="pretrain")),
                          resume=resume)
        if not phase1["_halted"] and not args.quiet:
            print("phase 2: fine-tuning on the labelled training split", file=sys.stderr)
        return phase1, None

    def report(self, model, rows: list[dict], test: dict, out_dir: str) -> dict:
        kind = "dense" if not model.config.num_experts else "MoE"
        loss_png = plots.loss_curve(rows, os.path.join(out_dir, "loss_curve.png"), f"MoE classifier ({kind})")
        heat_png = None
        if test["_layer_counts"] is not None:
            heat_png = plots.expert_heatmap(test["_layer_counts"], os.path.join(out_dir, "expert_heatmap.png"),
                                            test["_class_counts"], self.names, title="test split")
        return {"loss_curve": loss_png, "expert_heatmap": heat_png}


def baselines(args, train_cfg: TrainConfig) -> dict:
    """The linear baseline of --compare, on the same split."""
    return {"tfidf_svm": tfidf_baseline(load_splits(args.data, args.text_col, args.label_col, train_cfg.seed,
                                                    True))}


# -----------------------------------------------------------------------------
# Using a trained classifier

class Predictor:
    """A trained classifier ready for batches of raw text: tokenizer + label names + a PyTorch model, or with
    backend="onnx" its exported ONNX file (<checkpoint>.onnx) on one reused ONNX Runtime session."""

    def __init__(self, path: str, device, backend: str = "torch"):
        self.device, self.backend = device, backend
        if backend == "onnx":
            from onnx_export import OnnxClassifier, onnx_path
            self.session = OnnxClassifier(onnx_path(path))
            self.tokenizer, self.names, self.max_len = (self.session.tokenizer, self.session.names,
                                                        self.session.max_len)
            self.device = torch.device("cpu")
            return
        self.model, self.tokenizer, ckpt = load_trained(path, "cls", TRAIN_HINT, device)
        self.max_len = self.model.config.max_len
        self.names = list(ckpt["label_names"])
        self.dtype = ckpt["train_config"].get("dtype", "fp32")

    @torch.no_grad()
    def logits(self, batch: dict) -> np.ndarray:
        """A batch from data.collate_cls -> logits (B, classes)."""
        if self.backend == "onnx":
            return self.session.logits(batch)
        with autocast(self.device, self.dtype):
            return self.model(**batch)[0].float().cpu().numpy()

    def predict(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities (len(texts), classes), in input order."""
        from tqdm import tqdm
        seqs = encode_texts(self.tokenizer, texts)
        probs = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        batches = length_bucketed_batches([len(s) for s in seqs], batch_size, None, shuffle=False)
        for idx in tqdm(batches, desc="classify", unit="batch", disable=not progress):
            batch = collate_cls(self.tokenizer, [seqs[i] for i in idx], None, self.max_len, self.device)
            probs[idx] = torch.from_numpy(self.logits(batch)).softmax(-1).numpy()
        return probs


def infer(args, device) -> dict:
    text = args.text
    if text is None or not text.strip():
        raise DataError("--text: empty text; give a sentence to classify, e.g. --text \"我爱编程\"")
    p = Predictor(args.checkpoint, device, args.backend)
    n_tokens = len(p.tokenizer.encode(text))
    if n_tokens > p.max_len - 2:
        print(f"note: text is {n_tokens} tokens; only the first {p.max_len - 2} are used", file=sys.stderr)
    probs = p.predict([text])[0]
    return {"label": p.names[int(probs.argmax())], "probs": {n: float(v) for n, v in zip(p.names, probs)}}


def classify(args, device) -> dict:
    """Label every row of --input; with a label column, also score the predictions."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
    df = read_table(args.input)
    texts = [str(t) for t in column(df, args.text_col, args.input)]
    p = Predictor(args.checkpoint, device, args.backend)
    probs = p.predict(texts, progress=not args.quiet)
    out = df.copy()
    out["pred"] = [p.names[i] for i in probs.argmax(1)]
    for j, n in enumerate(p.names):
        out[f"prob_{n}"] = probs[:, j]
    output = args.output or os.path.join(args.out_dir, "predictions.csv")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_write_csv(out, output)
    summary = {"input": args.input, "output": output, "rows": len(out)}
    if args.label_col in df.columns:
        truth = [str(l).strip() for l in df[args.label_col]]
        labels = p.names + sorted(set(truth) - set(p.names))
        summary["accuracy"] = float(accuracy_score(truth, out["pred"]))
        summary["macro_f1"] = float(f1_score(truth, out["pred"], average="macro", labels=labels, zero_division=0))
        print(classification_report(truth, out["pred"], labels=labels, zero_division=0, digits=4), file=sys.stderr)
        cm = confusion_matrix(truth, out["pred"], labels=labels)
        os.makedirs(args.out_dir, exist_ok=True)  # --output may have put the predictions elsewhere
        summary["confusion_matrix"] = plots.confusion_matrix_png(
            cm, labels, os.path.join(args.out_dir, "confusion_matrix.png"), f"confusion matrix: {args.input}")
    return summary


# -----------------------------------------------------------------------------
# Dense vs MoE at equal active parameters, and the TF-IDF baseline, on the same split

def tfidf_baseline(splits) -> dict:
    """TF-IDF over character 1-3-grams + LinearSVC, fit on train, scored on val and test."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import LinearSVC
    t0 = time.time()
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    clf = LinearSVC(C=0.5).fit(vec.fit_transform(splits["train"].text), splits["train"].label)
    out = {"train_seconds": time.time() - t0}
    for s in ("val", "test"):
        pred = clf.predict(vec.transform(splits[s].text))
        out[f"{s}_acc"] = float(accuracy_score(splits[s].label, pred))
        out[f"{s}_f1"] = float(f1_score(splits[s].label, pred, average="macro"))
    return out
