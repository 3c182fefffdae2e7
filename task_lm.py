"""The language-model task: People's Daily (or your text) -> tokenizer -> noisy top-k MoE decoder; generate, eval."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

import plots
from analyze import ANALYZE_TEXTS, routing_trace
from api import field
from checkpoint import load_trained
from config import ModelConfig, Options, TrainConfig
from data import DATASET_DIR, SPLITS, news_splits, read_text_lines, tokenizer_cache
from errors import DataError
from fsio import atomic_write_text
from runtime import autocast
from shards import Corpus, TokenStream, prepare
from task import Task, TaskData
from tokenizer import load_or_train

TRAIN_HINT = "python main.py --train --task lm"
EVAL_BATCHES = 16  # validation loss is averaged over this many fixed batches


# -----------------------------------------------------------------------------
# Data: one token stream per split, paragraphs separated by <|eos|>

def load_corpus(data: str | None, text_col: str, quiet: bool) -> Corpus:
    """The built-in People's Daily corpus (split 90/5/5 in file order, cached as text), or the user's files."""
    if not data:
        news_splits(quiet=quiet)
        return Corpus.presplit({s: os.path.join(DATASET_DIR, "news", f"{s}.txt") for s in SPLITS})
    return Corpus.of(data, text_col)


def random_batches(stream: TokenStream, T: int, B: int, seed: int, device):
    """Endless batches of random contiguous windows of T tokens (targets shifted by one)."""
    g = torch.Generator().manual_seed(seed)
    hi = len(stream) - T - 1
    if hi <= 0:
        raise DataError(f"training text has {len(stream)} tokens, fewer than one window of {T + 1}")
    while True:
        yield stream.windows(torch.randint(0, hi, (B,), generator=g).tolist(), T, device)


@torch.no_grad()
def evaluate(model, stream: TokenStream, T: int, B: int, device, dtype: str,
             max_batches: int = EVAL_BATCHES) -> dict:
    """Mean loss over fixed, evenly spaced windows (no dropout, no router noise), and bits per character."""
    model.eval()
    hi = len(stream) - T - 1
    if hi <= 0:
        raise DataError(f"held-out text has {len(stream)} tokens, fewer than one window of {T + 1}")
    n = min(max_batches * B, max(hi // T, 1))
    starts = np.linspace(0, hi, n).astype(int).tolist()
    total = 0.0
    for i in range(0, n, B):
        batch = stream.windows(starts[i:i + B], T, device)
        with autocast(device, dtype):
            _, _, info = model(**batch)
        total += float(info["ce"]) * len(starts[i:i + B])
    loss = total / n
    bpc = loss * (len(stream) / stream.chars) / math.log(2)  # nats per token -> bits per character
    return {"val_loss": loss, "val_bpc": bpc}


# -----------------------------------------------------------------------------
# Using a trained LM

def prompt_ids(tokenizer, prompt: str, max_len: int) -> list[int]:
    """[eos] + the prompt's ids (eos = "a paragraph starts here"), cropped to the context window with a notice."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    if len(ids) > max_len - 1:
        print(f"note: prompt is {len(ids)} tokens; keeping the last {max_len - 1} (the context window)",
              file=sys.stderr)
        ids = ids[-(max_len - 1):]
    return ids


def continuation(model, tokenizer, ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, generator, stop_at_eos: bool = False) -> Iterator[tuple[str, int]]:
    """Yield (new text, tokens so far) as the continuation of `ids` grows, for max_new_tokens tokens.

    End-of-text is the paragraph break of the training text: it yields "\n" and a new paragraph follows, or,
    with `stop_at_eos`, it ends the continuation. Text is yielded in whole characters: a character split across
    tokens waits for its last byte."""
    device = model.tok_emb.weight.device
    out, shown, n = [], "", 0
    eos = tokenizer.eos_id
    for n, tok in enumerate(model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k,
                                           top_p, eos_id=eos if stop_at_eos else None, generator=generator), 1):
        if tok == eos:
            rest = tokenizer.decode(out)[len(shown):]
            out, shown = [], ""
            if stop_at_eos:
                if rest:
                    yield rest, n
                return
            yield rest + "\n", n
            continue
        out.append(tok)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(shown):], n
            shown = text
    rest = tokenizer.decode(out)[len(shown):]
    if rest:
        yield rest, n


# -----------------------------------------------------------------------------
# The task

class LMData(TaskData):
    """Each split as one token stream read from the corpus's shards; training reads random windows of max_len
    tokens."""

    def __init__(self, tokenizer, corpus: Corpus, model_cfg: ModelConfig, quiet: bool):
        self.tokenizer, self.T = tokenizer, model_cfg.max_len
        folder, manifest = prepare(corpus, tokenizer, quiet=quiet)
        self.streams = {s: TokenStream.of_split(folder, manifest, s) for s in SPLITS}
        empty = [s for s in SPLITS if not len(self.streams[s])]
        if empty:
            docs = sum(v["documents"] for v in manifest["splits"].values())
            raise DataError(f"{corpus.name}: {docs} documents (non-empty lines or rows), too few "
                            f"to hold out val and test ({manifest['held_out_share']:.0%} each, by hash); "
                            f"the {' and '.join(empty)} split got none: give more text")

    def describe(self) -> str:
        return "train/val/test tokens " + "/".join(f"{len(self.streams[s]):,}" for s in SPLITS)

    def steps_per_epoch(self, cfg: TrainConfig) -> int:
        return max(len(self.streams["train"]) // (self.T * cfg.batch_size * cfg.accum_steps), 1)

    def batches(self, cfg: TrainConfig, device):
        return random_batches(self.streams["train"], self.T, cfg.batch_size, cfg.seed, device)

    def evaluate(self, model, split: str, cfg: TrainConfig, device) -> dict:
        return evaluate(model, self.streams[split], self.T, cfg.batch_size, device, cfg.dtype)

    def report(self, model, rows: list[dict], test: dict, out_dir: str) -> dict:
        kind = "dense" if not model.config.num_experts else "MoE"
        loss_png = plots.loss_curve(rows, os.path.join(out_dir, "loss_curve.png"), f"MoE language model ({kind})",
                                    quality_keys=("val_bpc",))
        heat_png = None
        loads = [r["expert_load"] for r in rows if r.get("expert_load")]
        if loads:
            ids = self.streams["test"].span(0, min(200, len(self.streams["test"]))).tolist()
            sample = self.tokenizer.decode(ids[:ids.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in ids
                                           else ids)[:40]  # the test split's first paragraph
            heat_png = plots.lm_expert_heatmap(np.asarray(loads).mean(0), *routing_trace(model, self.tokenizer, sample),
                                               os.path.join(out_dir, "expert_heatmap.png"))
        return {"loss_curve": loss_png, "expert_heatmap": heat_png}


class LMTask(Task):
    name, train_hint, select = "lm", TRAIN_HINT, "-val_loss"
    metrics = ("val_loss", "val_bpc", "test_loss", "test_bpc")
    modes = ("generate", "eval")
    route = "/api/generate"
    request_fields = {"prompt": "string", "max_new_tokens": "integer", "temperature": "number", "top_p": "number",
                      "top_k": "integer", "seed": "integer", "stop_at_eos": "boolean", "stream": "boolean"}

    def splits(self, opts: Options, train_cfg: TrainConfig) -> Corpus:
        return load_corpus(opts.data, opts.text_col, opts.quiet)

    def new_tokenizer(self, opts: Options, train_cfg: TrainConfig, model_cfg: ModelConfig, splits: Corpus):
        # named by the corpus's files, not by a hash of its text: a second run reads no text before its shards
        key = hashlib.sha256(f"{splits.key()} {train_cfg.tokenizer_sample_mb}".encode()).hexdigest()
        cache = tokenizer_cache(None if opts.data else "news", train_cfg.tokenizer, model_cfg.vocab_size, key=key)
        return load_or_train(train_cfg.tokenizer, lambda: splits.sample(train_cfg.tokenizer_sample_mb),
                             model_cfg.vocab_size, cache,
                             progress=not opts.quiet)

    def sized(self, model_cfg: ModelConfig, tokenizer, splits: Corpus) -> ModelConfig:
        return replace(model_cfg, vocab_size=tokenizer.n_vocab)

    def data(self, tokenizer, splits: Corpus, model_cfg: ModelConfig, opts: Options, start=None) -> LMData:
        return LMData(tokenizer, splits, model_cfg, opts.quiet)

    def generate(self, opts: Options, device) -> dict:
        """Sample --num_samples continuations of --prompt, printing text as it is produced."""
        if (opts.max_new_tokens < 1 or opts.num_samples < 1 or not 0 < opts.top_p <= 1
                or not 0 <= opts.temperature < math.inf or opts.top_k < 0):
            raise DataError("--generate: need max_new_tokens >= 1, num_samples >= 1, 0 < top_p <= 1, "
                            "0 <= temperature < inf, top_k >= 0")
        model, tokenizer, ckpt = load_trained(opts.checkpoint, "lm", TRAIN_HINT, device)
        ids = prompt_ids(tokenizer, opts.prompt, model.config.max_len)
        gen = torch.Generator(device=device).manual_seed(opts.seed)
        samples = []
        t0, n_tokens = time.time(), 0
        for s in range(opts.num_samples):
            if opts.num_samples > 1:
                print(f"--- sample {s + 1}", flush=True)
            print(opts.prompt, end="", flush=True)
            text, n = "", 0
            for piece, n in continuation(model, tokenizer, ids, opts.max_new_tokens, opts.temperature,
                                         opts.top_k, opts.top_p, gen, opts.stop_at_eos):
                print(piece, end="", flush=True)
                text += piece
            print(flush=True)
            if n < opts.max_new_tokens and not opts.quiet:
                print(f"(stopped at end-of-text after {n} of {opts.max_new_tokens} tokens: --stop_at_eos)",
                      file=sys.stderr)
            n_tokens += n
            samples.append(opts.prompt + text)
        path = os.path.join(opts.out_dir, "generated_text.txt")
        os.makedirs(opts.out_dir, exist_ok=True)
        atomic_write_text("\n\n".join(samples) + "\n", path)
        seconds = time.time() - t0
        return {"task": "lm", "output": path, "samples": len(samples), "new_tokens": n_tokens,
                "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1)}

    def eval(self, opts: Options, device) -> dict:
        """Loss and bits per character of a trained LM on any text file (all of it, in windows)."""
        if not opts.input:
            raise DataError("--eval needs --input FILE")
        model, tokenizer, ckpt = load_trained(opts.checkpoint, "lm", TRAIN_HINT, device)
        stream = TokenStream.of_texts(tokenizer, read_text_lines(opts.input, opts.text_col))
        res = evaluate(model, stream, model.config.max_len, 16, device, ckpt["train_config"].get("dtype", "fp32"),
                       max_batches=10 ** 9)
        return {"task": "lm", "input": opts.input, "tokens": len(stream), "chars": stream.chars,
                "loss": res["val_loss"], "bpc": res["val_bpc"], "checkpoint": opts.checkpoint,
                "provenance": ckpt.get("provenance")}

    def show(self, mode: str, result: dict, opts: Options) -> None:
        if mode == "generate":  # the text went to stdout as it was sampled; the summary goes to stderr
            print(json.dumps(result, ensure_ascii=False), file=sys.stderr)
        else:
            super().show(mode, result, opts)

    # ---- --analyze: the texts as one token stream, cut into context windows
    def analysis_texts(self, opts: Options, model, tokenizer, device) -> list:
        if opts.input:
            return read_text_lines(opts.input, opts.text_col)
        return news_splits(quiet=True)["test"][:ANALYZE_TEXTS]

    def analysis_batches(self, model, tokenizer, texts: list, device, batch_size: int = 64):
        T = model.config.max_len
        stream = [i for t in texts for i in [tokenizer.eos_id] + tokenizer.encode(t)]
        full = len(stream) // T * T
        windows = [stream[i:i + T] for i in range(0, full, T)]
        chunks = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        for chunk in chunks + ([[stream[full:]]] if full < len(stream) else []):  # the shorter tail on its own
            ids = torch.tensor(chunk, device=device)
            yield (ids,), {"": ids}

    # ---- --export onnx
    def export_inputs(self, ids, config=None) -> tuple[tuple, list[str]]:
        return (ids,), ["idx"]

    # ---- --serve
    def serve_load(self, path: str, device):
        return load_trained(path, "lm", TRAIN_HINT, device)

    def answer(self, loaded, req: dict, device) -> dict:
        text, tokens = "", 0
        for event in self.stream(loaded, req, device):
            text += event.get("text", "")
            tokens = event.get("new_tokens", tokens)
        return {"prompt": req.get("prompt", ""), "text": text, "new_tokens": tokens}

    def stream(self, loaded, req: dict, device):
        """{"text": piece, "new_tokens": n} as the continuation grows, then {"done": true, "new_tokens": n}."""
        model, tokenizer, _ = loaded
        prompt = field(req, "prompt", str, "", allow_empty=True)
        n = field(req, "max_new_tokens", int, 100, lo=1, hi=1024)
        temperature = field(req, "temperature", float, 0.8, lo=0.0, hi=5.0)
        top_p = field(req, "top_p", float, 0.95, lo=1e-6, hi=1.0)
        top_k = field(req, "top_k", int, 0, lo=0, hi=tokenizer.n_vocab)
        seed = field(req, "seed", int, 1337, lo=0, hi=2 ** 63 - 1)
        stop_at_eos = field(req, "stop_at_eos", bool, False)
        field(req, "stream", bool, False)
        gen = torch.Generator(device=device).manual_seed(seed)
        ids = prompt_ids(tokenizer, prompt, model.config.max_len)
        tokens = 0
        for piece, tokens in continuation(model, tokenizer, ids, n, temperature, top_k, top_p, gen, stop_at_eos):
            yield {"text": piece, "new_tokens": tokens}
        yield {"done": True, "new_tokens": tokens}


TASK = LMTask()
