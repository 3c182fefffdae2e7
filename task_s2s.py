"""The seq2seq task: pinyin -> Chinese characters (or any source -> target pairs) with an encoder-decoder MoE."""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import charlm
import plots
from analyze import ANALYZE_TEXTS, routing_trace
from api import field
from checkpoint import load_trained
from config import ModelConfig, Options, TrainConfig
from data import (length_bucketed_batches, pinyin_splits, read_table, read_text_lines, tokenizer_cache,
                  user_pair_splits)
from errors import DataError
from fsio import atomic_write_csv
from moe import MoE
from pinyin import close_sentence, lexicon_pairs, open_pinyin_sources, pinyin_spans, word_logprob
from runtime import autocast
from shards import packed
from task import Task, TaskData
from tokenizer import even_sample, load_or_train

TRAIN_HINT = "python main.py --train --task seq2seq"
# Decoding a model trained on the built-in pinyin pairs (fusion_for, word_prior_for): at every beam step the
# character n-gram model of charlm.py (shallow fusion, weight FUSION) and the input method's constraint that each
# character reads as its syllable; the finished hypotheses reranked by jieba's word prior (weight WORD_PRIOR).
# Chosen on the whole validation split, beam 4 (char accuracy; docs/experiments.md): constraint without fusion
# 0.8813, fusion 0.3 0.9017, 0.5 0.9067, 0.7 0.9071, 1.0 0.9072 (word prior 0.15); 0.7 without the prior 0.9060.
FUSION = 0.7
WORD_PRIOR = 0.15
EVAL_DECODE = 400  # validation sentences decoded at every evaluation (all of the test split at the end)


# -----------------------------------------------------------------------------
# Data

def load_splits(data: str | None, seed: int, quiet: bool, lexicon: int = 0) -> dict:
    """The user's pairs, or the built-in pinyin pairs with `lexicon` word-list pairs (pinyin.lexicon_pairs) added
    to the training split only: validation and test stay news sentences."""
    if data:
        return user_pair_splits(data, seed)
    splits = pinyin_splits(quiet=quiet)
    if lexicon:
        splits["train"] = pd.concat([splits["train"], lexicon_pairs(lexicon)], ignore_index=True)
    return splits


class Pairs:
    """A split as token ids (Packed: encoded once, 4 bytes an id): sources truncated to max_len, targets to
    max_len - 1 (room for <bos>/<eos>)."""

    def __init__(self, tokenizer, df, max_len: int, quiet: bool = True):
        self.sources, self.targets = list(df.source), list(df.target)
        self.src = packed(tokenizer, self.sources, quiet=quiet).truncated(max_len)
        self.tgt = packed(tokenizer, self.targets, quiet=quiet).truncated(max_len - 1)

    def __len__(self):
        return len(self.src)


def collate(tokenizer, src: list[list[int]], tgt: list[list[int]] | None, device) -> dict:
    """Right-padded source; decoder input <bos> + target, labels target + <eos> (-100 on padding)."""
    ids, mask = tokenizer.pad_batch(src, 10 ** 9, add_special=False)
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if tgt is not None:
        dec, dec_mask = tokenizer.pad_batch([[tokenizer.bos_id] + t for t in tgt], 10 ** 9, add_special=False)
        labels = [t + [tokenizer.eos_id] + [-100] * (len(dec[0]) - len(t) - 1) for t in tgt]
        batch.update(decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask),
                     labels=torch.tensor(labels))
    return {k: v.to(device) for k, v in batch.items()}


def batch_stream(tokenizer, pairs: Pairs, batch_size: int, seed: int, device):
    """Endless length-bucketed batches, reshuffled every epoch from one seeded RNG (replayable for --resume)."""
    rng = random.Random(seed)
    lengths = (pairs.src.lengths() + pairs.tgt.lengths()).tolist()
    while True:
        for idx in length_bucketed_batches(lengths, batch_size, rng):
            yield collate(tokenizer, [pairs.src[i] for i in idx], [pairs.tgt[i] for i in idx], device)


# -----------------------------------------------------------------------------
# Metrics

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(preds: list[str], targets: list[str]) -> dict:
    """Character accuracy = 1 - CER (edit distance / target characters, over the whole set); exact match."""
    errors = sum(edit_distance(p, t) for p, t in zip(preds, targets))
    chars = sum(len(t) for t in targets)
    return {"char_acc": 1 - errors / max(chars, 1),
            "exact_match": sum(p == t for p, t in zip(preds, targets)) / max(len(targets), 1)}


# -----------------------------------------------------------------------------
# Decoding

def rerank(hyps: list[tuple[float, str]], word_prior: float) -> list[tuple[float, str]]:
    """Beam hypotheses (score, text) of one source, best first, with `word_prior` times the text's per-character
    word log-probability (pinyin.word_logprob) added to each score: N-best rescoring with a word-level prior, for
    words the sentence pairs seldom showed (早上好 over 早上号). word_prior 0: the model's order."""
    if not word_prior:
        return sorted(hyps, key=lambda h: -h[0])
    scored = [(score + word_prior * word_logprob(text) / max(len(text), 1), text) for score, text in hyps]
    return sorted(scored, key=lambda h: -h[0])


def fusion_term(tokenizer, weight: float, pinyin_sources: list[str] | None = None, beam: int = 1):
    """What the beam search adds to the model's log-probabilities at every step: `weight` times the character
    n-gram model (shallow fusion), and for a pinyin model's `pinyin_sources` the input method's constraint that
    each character reads as its syllable (charlm.PinyinConstraint). None when neither applies."""
    terms = ([charlm.Fusion(charlm.load(), tokenizer, weight)] if weight else []) + (
        [charlm.PinyinConstraint(tokenizer, pinyin_sources, beam)] if pinyin_sources else [])
    if not terms:
        return None

    def term(rows: list[list[int]]):  # each beam's ids decoded once a step, for every term
        written = [tokenizer.decode(ids) for ids in rows]
        return sum(t(written) for t in terms)
    return term


@torch.inference_mode()
def convert(model, tokenizer, src_ids: list[list[int]], device, dtype: str = "fp32", beam: int = 1,
            length_penalty: float = 1.0, batch_size: int = 128, progress: bool = False,
            word_prior: float = 0.0, fusion: float = 0.0, pinyin: bool = False) -> list[str]:
    """Decode every source (greedy, or beam search when beam > 1 with `fusion` times the character n-gram model
    and, for `pinyin` sources, the pinyin constraint in every step, its hypotheses reranked with `word_prior`);
    batches of similar length, original order."""
    model.eval()
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    out = [""] * len(src_ids)
    for start in tqdm(range(0, len(order), batch_size), desc="decode", disable=not progress, unit="batch"):
        idx = order[start:start + batch_size]
        batch = collate(tokenizer, [src_ids[i] or [tokenizer.eos_id] for i in idx], None, device)
        args = (batch["input_ids"], batch["attention_mask"], tokenizer.bos_id, tokenizer.eos_id,
                model.config.max_len - 1)
        with autocast(device, dtype):
            if beam == 1:
                texts = [tokenizer.decode(seq) for seq in model.greedy(*args)]
            else:
                sources = [tokenizer.decode(src_ids[i]) for i in idx] if pinyin else None
                texts = [rerank([(score, tokenizer.decode(seq)) for score, seq in hyps], word_prior)[0][1]
                         for hyps in model.beam_hypotheses(*args, beam, length_penalty,
                                                           fusion_term(tokenizer, fusion, sources, beam))]
        for i, text in zip(idx, texts):
            out[i] = text
    return out


@torch.no_grad()
def evaluate(model, tokenizer, pairs: Pairs, device, dtype: str, decode: int = EVAL_DECODE,
             batch_size: int = 128, prefix: str = "val") -> dict:
    """Teacher-forced loss over the split (no dropout, no router noise) and greedy-decoding accuracy on the
    first `decode` pairs (all when 0)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = collate(tokenizer, pairs.src[i:i + batch_size], pairs.tgt[i:i + batch_size], device)
        with autocast(device, dtype):
            _, _, info = model(**batch)
        n = int((batch["labels"] != -100).sum())
        total, count = total + float(info["ce"]) * n, count + n
    n = decode or len(pairs)
    preds = convert(model, tokenizer, pairs.src[:n], device, dtype, batch_size=batch_size)
    quality = score(preds, pairs.targets[:n])
    return {f"{prefix}_loss": total / max(count, 1), f"{prefix}_char_acc": quality["char_acc"],
            f"{prefix}_exact_match": quality["exact_match"], "_preds": preds}


def moe_layer_names(model) -> list[str]:
    """'enc 0', 'dec 1', ... for the MoE layers, in the order their stats are logged (encoder first)."""
    return [f"{side} {i}" for side, stack in (("enc", model.encoder), ("dec", model.decoder))
            for i, block in enumerate(stack) if isinstance(block.ffn, MoE)]


# -----------------------------------------------------------------------------
# Using a trained model

def source_ids(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [s[:max_len] for s in tokenizer.encode_batch(texts)]


def fusion_for(ckpt: dict, fusion: float | None) -> float:
    """An explicit weight, else FUSION for a model trained on the built-in pinyin pairs, else 0."""
    if fusion is not None:
        return fusion
    return FUSION if ckpt.get("source") == "pinyin" else 0.0


def word_prior_for(ckpt: dict, word_prior: float | None) -> float:
    """An explicit weight, else WORD_PRIOR for a model trained on the built-in pinyin pairs (Chinese targets),
    else 0 (a user's pairs may not be Chinese at all)."""
    if word_prior is not None:
        return word_prior
    return WORD_PRIOR if ckpt.get("source") == "pinyin" else 0.0


@torch.inference_mode()
def ranked(model, tokenizer, ckpt: dict, text: str, device, beam: int, length_penalty: float, n: int,
           word_prior: float, fusion: float) -> tuple[list[tuple[float, str]], str, bool, int]:
    """One source -> (its distinct conversions (score, text) best first, the source as the model read it,
    truncated?, source tokens).

    For a pinyin model the input is first put in the training sources' form (`pinyin.pinyin_sources`: case, ü,
    spacing, syllables typed together, a final mark); when a run of letters splits into syllables in several
    ways, each split is decoded and the scores decide. A final mark added for the model is dropped again."""
    sources, added_mark, pinyin = [text], False, ckpt.get("source") == "pinyin"
    if pinyin:
        sources, added_mark = close_sentence(open_pinyin_sources(text))
    max_len = model.config.max_len
    encoded = tokenizer.encode_batch(sources)
    batch = collate(tokenizer, [s[:max_len] or [tokenizer.eos_id] for s in encoded], None, device)
    with autocast(device, ckpt["train_config"].get("dtype", "fp32")):
        hyps = model.beam_hypotheses(batch["input_ids"], batch["attention_mask"], tokenizer.bos_id,
                                     tokenizer.eos_id, max_len - 1, max(beam, n), length_penalty,
                                     fusion_term(tokenizer, fusion, sources if pinyin else None, max(beam, n)))
    decoded = [(score, tokenizer.decode(out)) for per_source in hyps for score, out in per_source]
    if added_mark:
        decoded = [(score, words[:-1] if words.endswith("。") else words) for score, words in decoded]
    seen, found = set(), []
    for score, words in rerank(decoded, word_prior):
        if words not in seen:
            seen.add(words)
            found.append((score, words))
    return found, sources[0], len(encoded[0]) > max_len, len(encoded[0])


def candidates(model, tokenizer, ckpt: dict, text: str, device, beam: int = 4, length_penalty: float = 1.0,
               n: int = 1, word_prior: float | None = None, fusion: float | None = None) -> dict:
    """One user input -> its `n` best conversions with their scores (an input method's candidate list), ranked
    with the character n-gram model fused into every beam step and the word prior (fusion_for and
    word_prior_for say which weights).

    For a pinyin model, what is no pinyin (Latin words that split into no syllables, numbers) is not converted:
    it stays as typed, between the conversions of the pinyin around it, and is listed under "kept"."""
    text = text.strip()
    weights = (word_prior_for(ckpt, word_prior), fusion_for(ckpt, fusion))
    spans = pinyin_spans(text) if ckpt.get("source") == "pinyin" else [(text, True)]
    kept = [piece for piece, convert in spans if not convert]
    converted, read, truncated, n_tokens = [], [], False, 0
    for piece, convert in spans:
        if convert:
            found, source, cut, tokens = ranked(model, tokenizer, ckpt, piece, device, beam, length_penalty, n,
                                                *weights)
            converted.append(found or [(0.0, "")])
            read.append(source)
            truncated, n_tokens = truncated or cut, max(n_tokens, tokens)
        else:
            converted.append([(0.0, piece)])
            read.append(piece)
    # the i-th candidate: each piece's i-th conversion (its best when it has fewer); scores add up
    found = []
    for i in range(max(len(c) for c in converted) if converted else 0):
        pieces = [c[min(i, len(c) - 1)] for c in converted]
        joined = "".join(words for _, words in pieces)
        if joined not in {f["text"] for f in found}:
            found.append({"text": joined, "score": round(sum(score for score, _ in pieces), 4)})
    found = found or [{"text": text, "score": 0.0}]
    return {"source": " ".join(read), "pred": found[0]["text"], "candidates": found[:n], "kept": kept,
            "truncated": truncated, "source_tokens": n_tokens}


# -----------------------------------------------------------------------------
# The task

class Seq2SeqData(TaskData):
    """Each split as token-id pairs; training reads length-bucketed batches."""

    def __init__(self, tokenizer, splits: dict, model_cfg: ModelConfig, user_data: bool, quiet: bool = True):
        self.tokenizer, self.frames = tokenizer, splits
        self.pairs = {s: Pairs(tokenizer, df, model_cfg.max_len, quiet) for s, df in splits.items()}
        self.source = "text" if user_data else "pinyin"  # "pinyin": --infer may normalise what a user types

    def describe(self) -> str:
        return "train/val/test pairs " + "/".join(f"{len(self.pairs[s]):,}" for s in ("train", "val", "test"))

    def extra(self) -> dict:
        return {"source": self.source}

    def steps_per_epoch(self, cfg: TrainConfig) -> int:
        return max(len(self.pairs["train"]) // (cfg.batch_size * cfg.accum_steps), 1)

    def batches(self, cfg: TrainConfig, device):
        return batch_stream(self.tokenizer, self.pairs["train"], cfg.batch_size, cfg.seed, device)

    def evaluate(self, model, split: str, cfg: TrainConfig, device) -> dict:
        """Validation decodes its first EVAL_DECODE sentences greedily; the test split decodes them all."""
        return evaluate(model, self.tokenizer, self.pairs[split], device, cfg.dtype,
                        decode=EVAL_DECODE if split == "val" else 0)

    def report(self, model, rows: list[dict], test: dict, out_dir: str) -> dict:
        predictions = os.path.join(out_dir, "test_predictions.csv")
        atomic_write_csv(self.frames["test"].assign(pred=test["_preds"]), predictions)
        kind = "dense" if not model.config.num_experts else "MoE"
        loss_png = plots.loss_curve(rows, os.path.join(out_dir, "loss_curve.png"), f"seq2seq ({kind})",
                                    quality_keys=("val_char_acc", "val_exact_match"))
        heat_png = None
        loads = [r["expert_load"] for r in rows if r.get("expert_load")]
        if loads:
            tokens, experts = routing_trace(model, self.tokenizer, self.pairs["test"].sources[0],
                                            forward=lambda ids: model.encode(ids, torch.ones_like(ids)))
            heat_png = plots.lm_expert_heatmap(np.asarray(loads).mean(0), tokens, experts,
                                               os.path.join(out_dir, "expert_heatmap.png"),
                                               layer_names=moe_layer_names(model))
        return {"loss_curve": loss_png, "expert_heatmap": heat_png, "test_predictions": predictions}


class Seq2SeqTask(Task):
    name, train_hint, select = "seq2seq", TRAIN_HINT, "val_char_acc"
    metrics = ("val_loss", "val_char_acc", "val_exact_match", "test_loss", "test_char_acc", "test_exact_match")
    modes = ("infer", "classify")
    route = "/api/pinyin"
    request_fields = {"text": "string", "beam": "integer", "num_candidates": "integer"}

    def splits(self, opts: Options, train_cfg: TrainConfig) -> dict:
        if opts.data and train_cfg.lexicon_pairs:
            print(f"note: lexicon_pairs={train_cfg.lexicon_pairs} is for the built-in pinyin pairs; with --data it "
                  "adds nothing", file=sys.stderr)
        return load_splits(opts.data, train_cfg.seed, opts.quiet, train_cfg.lexicon_pairs)

    def new_tokenizer(self, opts: Options, train_cfg: TrainConfig, model_cfg: ModelConfig, splits: dict):
        lexicon = f"_lexicon{train_cfg.lexicon_pairs}" if train_cfg.lexicon_pairs else ""  # its words shape the BPE
        texts = even_sample([*splits["train"].source, *splits["train"].target], train_cfg.tokenizer_sample_mb)
        cache = tokenizer_cache(None if opts.data else "pinyin", train_cfg.tokenizer + lexicon, model_cfg.vocab_size,
                                texts)
        return load_or_train(train_cfg.tokenizer, texts, model_cfg.vocab_size, cache, progress=not opts.quiet)

    def sized(self, model_cfg: ModelConfig, tokenizer, splits: dict) -> ModelConfig:
        return replace(model_cfg, vocab_size=tokenizer.n_vocab)

    def data(self, tokenizer, splits: dict, model_cfg: ModelConfig, opts: Options, start=None) -> Seq2SeqData:
        return Seq2SeqData(tokenizer, splits, model_cfg, user_data=bool(opts.data), quiet=opts.quiet)

    def infer(self, opts: Options, device) -> dict:
        """Convert one --text (pinyin for the default model; any source text for a model trained on your pairs)."""
        if not opts.text or not opts.text.strip():
            raise DataError("--infer needs --text, e.g. --text \"wo ai bian cheng\"")
        model, tokenizer, ckpt = load_trained(opts.checkpoint, "seq2seq", TRAIN_HINT, device)
        t0 = time.perf_counter()
        out = candidates(model, tokenizer, ckpt, opts.text, device, opts.beam, opts.length_penalty,
                         opts.num_candidates, opts.word_prior, opts.fusion)
        n_tokens = out.pop("source_tokens")
        if out["kept"]:
            print(f"note: not pinyin, kept as typed: {', '.join(out['kept'])}", file=sys.stderr)
        if out["truncated"]:
            print(f"note: source is {n_tokens} tokens; only the first {model.config.max_len} are converted",
                  file=sys.stderr)
        return {**out, "beam": opts.beam, "ms": round((time.perf_counter() - t0) * 1000, 1)}

    def classify(self, opts: Options, device) -> dict:
        """Convert every row of --input (columns source or question, or --text_col); keep the input columns, add
        `pred`; with target (or answer) columns, report character accuracy and exact match."""
        if not opts.input:
            raise DataError("--classify needs --input FILE")
        df = read_table(opts.input)
        src_col = next((c for c in ("source", "question", opts.text_col) if c in df.columns), None)
        if src_col is None:
            raise DataError(f"{opts.input}: need a source (or question) column, or name one with --text_col; "
                            f"columns: {', '.join(map(str, df.columns))}")
        model, tokenizer, ckpt = load_trained(opts.checkpoint, "seq2seq", TRAIN_HINT, device)
        sources = [str(s).strip() for s in df[src_col]]
        t0 = time.time()
        preds = convert(model, tokenizer, source_ids(tokenizer, sources, model.config.max_len), device,
                        ckpt["train_config"].get("dtype", "fp32"), opts.beam, opts.length_penalty,
                        progress=not opts.quiet, word_prior=word_prior_for(ckpt, opts.word_prior),
                        fusion=fusion_for(ckpt, opts.fusion), pinyin=ckpt.get("source") == "pinyin")
        seconds = time.time() - t0
        out = opts.output or os.path.join(opts.out_dir, "predictions.csv")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_write_csv(df.assign(pred=preds), out)
        result = {"task": "seq2seq", "input": opts.input, "output": out, "rows": len(df), "beam": opts.beam,
                  "sentences_per_s": round(len(df) / max(seconds, 1e-9), 1)}
        tgt_col = next((c for c in ("target", "answer") if c in df.columns), None)
        if tgt_col:
            result.update(score(preds, [str(t).strip() for t in df[tgt_col]]))
        return result

    def show(self, mode: str, result: dict, opts: Options) -> None:
        if mode != "infer" or opts.json:
            return super().show(mode, result, opts)
        if opts.num_candidates == 1:
            print(result["pred"])
            return
        for i, c in enumerate(result["candidates"], 1):
            print(f"{i}. {c['text']}  ({c['score']:.3f})")

    # ---- --analyze: the encoder reads the sources; the decoder its own greedy conversion (or the targets)
    def analysis_texts(self, opts: Options, model, tokenizer, device) -> list:
        if opts.input:
            texts = read_text_lines(opts.input, opts.text_col)
            return list(zip(texts, convert(model, tokenizer, source_ids(tokenizer, texts, model.config.max_len),
                                           device)))
        df = pinyin_splits(quiet=True)["test"][:ANALYZE_TEXTS]
        return list(zip(df.source, df.target))

    def analysis_batches(self, model, tokenizer, texts: list, device, batch_size: int = 64):
        T = model.config.max_len
        src = source_ids(tokenizer, [s for s, _ in texts], T)
        tgt = [t[:T - 1] for t in tokenizer.encode_batch([t for _, t in texts])]
        for i in range(0, len(src), batch_size):
            batch = collate(tokenizer, src[i:i + batch_size], tgt[i:i + batch_size], device)
            yield ((batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                    batch["decoder_attention_mask"]),
                   {"encoder": batch["input_ids"], "decoder": batch["decoder_input_ids"]})

    def routing_input(self, text: str) -> list:
        return [(text, "")]  # the encoder's routing of the source; no target

    def export_inputs(self, ids, config=None):
        raise DataError("--export onnx: --task seq2seq does not export (only cls and lm); seq2seq decoding runs "
                        "loops with KV caches in Python")

    # ---- --serve
    def serve_load(self, path: str, device):
        return load_trained(path, "seq2seq", TRAIN_HINT, device)

    def answer(self, loaded, req: dict, device) -> dict:
        model, tokenizer, ckpt = loaded
        text = field(req, "text", str).strip()
        beam = field(req, "beam", int, 4, lo=1, hi=8)  # 4: the CLI's default, chosen on validation
        n = field(req, "num_candidates", int, 1, lo=1, hi=16)
        out = candidates(model, tokenizer, ckpt, text, device, beam, n=n)
        return {"source": text, "pred": out["pred"], "candidates": out["candidates"], "kept": out["kept"],
                "beam": beam}


TASK = Seq2SeqTask()
