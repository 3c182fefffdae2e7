"""MoE toolkit for Chinese text: one command, several modes.

    python main.py --train --task cls                 train the MiniBERT-MoE sentiment classifier
    python main.py --infer --text "我爱编程"            classify one text with the trained checkpoint
    python main.py --classify --input reviews.csv     label every row of a file
    python main.py --train --task lm                  train the noisy top-k MoE language model
    python main.py --generate --prompt "新华社北京"     sample text from it (KV cache)
    python main.py --eval --task lm --input my.txt    its loss and bits per character on a text file
    python main.py --train --task seq2seq             train the encoder-decoder MoE: pinyin -> characters
    python main.py --infer --task seq2seq --text "wo ai bian cheng"    convert one text (--beam 4 for beam search)
    python main.py --compare --task cls|lm|seq2seq    MoE vs dense at the same active params and budget
    python main.py --export onnx [--task lm]          ONNX file (dynamic axes); then --infer --backend onnx
    python main.py --analyze --checkpoint X.pt        routing analysis: experts by token kind and class (PNGs)
    python main.py --serve                            web page + JSON API on http://127.0.0.1:8000 (uvicorn)
    torchrun --nproc_per_node=2 main.py --train ...   DistributedDataParallel training (gloo on CPU, nccl on CUDA)

Configs flow: dataclass defaults -> configs.json preset (--preset) -> flags (--epochs ... and --set key=value).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as dist

import analyze
import onnx_export
import pipeline
import runs
import server
from config import FLAG_KEYS, Options, resolve_config
from distributed import check_expert_parallel, dist_info, init_distributed
from errors import DataError
from fsio import exclusive, writable_dir, writable_file
from registry import TASKS, tasks_with
from runtime import check_training_dtype, pick_device, resolve_compile, resolve_dtype

HERE = os.path.dirname(os.path.abspath(__file__))


class VersionAction(argparse.Action):
    """--version: the project's version (git describe) and torch's, asked only when the flag is given."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"moe-toolkit {runs.version()}, torch {torch.__version__}")
        parser.exit(0)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the message and where to look) instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python main.py --help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="main.py", description=__doc__.split("\n\n")[0],
        epilog="Every run prints its resolved config; --train and --compare end with one JSON summary line.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("mode (pick one)").add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train a model for --task and save a checkpoint")
    mode.add_argument("--infer", action="store_true",
                      help="classify (cls) or convert (seq2seq) one --text with a trained checkpoint")
    mode.add_argument("--classify", action="store_true",
                      help="label (cls) or convert (seq2seq) every row of --input; scores the predictions when "
                           "the file has labels (targets)")
    mode.add_argument("--compare", action="store_true",
                      help="train MoE and dense (same active params, same budget; cls adds the TF-IDF baseline); "
                           "writes compare.md and compare.png")
    mode.add_argument("--generate", action="store_true", help="sample text from the trained language model")
    mode.add_argument("--eval", action="store_true", help="--task lm: loss and bits per character on --input")
    mode.add_argument("--export", choices=("onnx",),
                      help="write the trained cls (or lm) checkpoint as ONNX with dynamic batch and sequence axes "
                           "(default <checkpoint>.onnx, or --output), checked against PyTorch")
    mode.add_argument("--analyze", action="store_true",
                      help="routing analysis of a trained MoE checkpoint (its task is read from the file): per "
                           "layer, experts by token kind and by predicted class, router entropy, load CV, top-k "
                           "co-occurrence; PNGs in --out_dir and one JSON line (inputs: the built-in test split, "
                           "or --input)")
    mode.add_argument("--serve", action="store_true",
                      help="serve a web page and a JSON API for the trained models (sentiment, generation, pinyin)")

    g = p.add_argument_group("what and where")
    g.add_argument("--task", choices=TASKS, default=None,
                   help="cls: sentiment classification (default); lm: language model (default for --generate); "
                        "seq2seq: encoder-decoder, pinyin -> characters by default")
    g.add_argument("--preset", default=None, help="named preset in configs.json (default: the task's 'default')")
    g.add_argument("--checkpoint", default=None,
                   help="model file read by --infer, --generate, ... (default checkpoints/<task>.pt, the latest "
                        "finished run's best model); with --train, where the best model goes instead of "
                        "<run folder>/model.pt (an existing file there is moved aside, never overwritten)")
    g.add_argument("--out_dir", default=None,
                   help="--train: the run folder (default runs/<task>/<--name or a timestamp>/; one that holds a "
                        "run is refused unless --resume); other modes: where plots and predictions go "
                        "(default runs/<task>/)")
    g.add_argument("--name", default=None, help="--train: the run's folder name under runs/<task>/")
    g.add_argument("--data", default=None,
                   help="your own data. cls: a csv/tsv/jsonl/parquet file (split 80/10/10) or a directory with train, "
                        "val (or dev) and test files; lm: a UTF-8 text file (one paragraph a line), a table's "
                        "--text_col, a directory of such files or a glob, of any size (prepared once into token "
                        "shards under dataset/shards/; val and test held out by a hash of each paragraph); seq2seq: "
                        "a csv/tsv/jsonl/parquet file with source and target (or question and answer) columns "
                        "(shuffled, split 90/5/5)")
    g.add_argument("--text_col", default="text", help="text column of --data/--input (default text)")
    g.add_argument("--label_col", default="label", help="label column of --data/--input (default label)")
    g.add_argument("--text", default=None, help="--infer: the text to classify (cls) or convert (seq2seq)")
    g.add_argument("--input", default=None, help="--classify: the file to label; --eval: the text file to score")
    g.add_argument("--output", default=None, help="--classify: predictions CSV (default <out_dir>/predictions.csv)")
    g.add_argument("--json", action="store_true", help="--infer: print one JSON object instead of a table")
    g.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="--infer/--classify --task cls: run PyTorch, or ONNX Runtime on <checkpoint>.onnx "
                        "(written by --export onnx)")
    g.add_argument("--tokenizer", choices=("bpe", "bpe_hanzi", "char"),
                   help="--train: byte-level BPE (default for cls, lm); bpe_hanzi: BPE that never merges across Han "
                        "characters, one token per character (default for seq2seq); char: one id per character")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--init_from", default=None, metavar="DENSE_CHECKPOINT",
                   help="--train: sparse upcycling. Start the MoE from a dense checkpoint of the same task (trained "
                        "with --num_experts 0): its shape, tokenizer and weights, each expert a copy of its FFN, "
                        "routers fresh (cls: no second masked-LM pretraining)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or chatter on stderr")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="--train: continue an interrupted run from its model.last.pt with its optimizer, schedule, "
                        "scaler, step, RNG and data position (cls: in the phase it stopped in): the latest "
                        "unfinished run of the task, or RUN (a name under runs/<task>/ or a folder)")
    g.add_argument("--version", action=VersionAction, help="print the project and torch versions and exit")
    g.add_argument("--tensorboard", action="store_true",
                   help="--train: also write TensorBoard event files to <out_dir>/tensorboard "
                        "(pip install tensorboard)")
    g.add_argument("--mlflow", action="store_true",
                   help="--train: also log params, metrics and PNGs to MLflow: ./mlruns, or $MLFLOW_TRACKING_URI "
                        "(pip install mlflow-skinny)")

    w = p.add_argument_group("web page (--serve)")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8000)
    w.add_argument("--checkpoint_dir", default="checkpoints", help="where cls.pt, lm.pt and seq2seq.pt are")
    w.add_argument("--limit_concurrency", type=int, default=Options.limit_concurrency,
                   help="requests in flight at once; more are answered 503 with Retry-After (default %(default)s)")

    h = p.add_argument_group("config overrides (win over the preset)")
    h.add_argument("--epochs", type=int)
    h.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    h.add_argument("--time_budget", type=float, help="stop after this many seconds of training")
    h.add_argument("--batch_size", type=int)
    h.add_argument("--lr", type=float)
    h.add_argument("--num_experts", type=int, help="0 gives the dense model with the same active parameters")
    h.add_argument("--top_k", type=int, help="experts per token; with --generate: sample from the K likeliest "
                                             "tokens only (0: all)")
    h.add_argument("--num_layers", type=int, help="0 gives the pooled-embedding -> MoE -> head model")
    h.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (default): bf16 on CUDA, fp32 on CPU (bf16 measured slower there); bf16: autocast "
                        "(CPU and CUDA); fp16: autocast + GradScaler (CUDA only)")
    h.add_argument("--seed", type=int)
    h.add_argument("--optimizer", choices=("adamw", "muon"),
                   help="adamw, or muon: Muon for the hidden matrices of the blocks (per expert for the experts), "
                        "AdamW for embeddings, norms, router and head, at the same --lr. Default: the preset's "
                        "(muon for lm and seq2seq; cls fine-tunes with adamw and pretrains with its "
                        "pretrain_optimizer, muon)")
    h.add_argument("--compile", choices=("auto", "on", "off"),
                   help="torch.compile the training step. auto (default): on for CUDA, off on CPU (measured "
                        "faster / slower there); the first step then takes seconds to minutes; if compiling fails, "
                        "a one-line notice and eager training")
    gen = p.add_argument_group("generation (--generate)")
    gen.add_argument("--prompt", default="", help="text to continue (cropped to the context window)")
    gen.add_argument("--max_new_tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    gen.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling: smallest set with this mass")
    gen.add_argument("--num_samples", type=int, default=1)
    gen.add_argument("--stop_at_eos", action="store_true",
                     help="end a sample at its first end-of-text (default: that is a paragraph break and the "
                          "text goes on for --max_new_tokens tokens)")
    s2s = p.add_argument_group("seq2seq decoding (--infer/--classify --task seq2seq)")
    s2s.add_argument("--beam", type=int, default=4,
                     help="beam size (default 4, chosen on validation, see docs/results.md; 1: greedy, faster)")
    s2s.add_argument("--num_candidates", type=int, default=1,
                     help="--infer: show the N best conversions with their scores, as an input method does")
    s2s.add_argument("--length_penalty", type=float, default=1.0,
                     help="beam score = log-probability / length ** length_penalty")
    s2s.add_argument("--word_prior", type=float, default=None,
                     help="weight of jieba's word prior when ranking the beam's conversions (0: the model alone; "
                          "default: the weight chosen on validation for the built-in pinyin model, 0 for a model "
                          "trained on your own pairs)")
    s2s.add_argument("--fusion", type=float, default=None,
                     help="shallow fusion: weight of the character n-gram model of everyday Chinese (charlm.py) "
                          "added at every beam step (0: off; default: the weight chosen on validation for the "
                          "built-in pinyin model, 0 for a model trained on your own pairs)")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any field of the task's model config or of TrainConfig (config.py), e.g. "
                        "--set d_model=256 --set noisy_gate=false")
    return p


# -----------------------------------------------------------------------------
# Output paths: checked before any work, so a long run never dies at its last write


def check_outputs(args, opts: Options) -> None:
    """The files and folders this mode will write."""
    if (args.train or args.compare) and not os.path.exists(opts.out_dir):
        # a new run folder: made when the run starts, so that a refused command leaves no empty one behind
        writable_dir(os.path.dirname(os.path.abspath(opts.out_dir)), "--out_dir", shown=opts.out_dir)
    elif args.train or args.compare or args.classify or args.generate or args.analyze:
        writable_dir(opts.out_dir, "--out_dir")
    if (args.train or args.compare) and os.path.dirname(os.path.abspath(opts.checkpoint)) != os.path.abspath(
            opts.out_dir):  # a --checkpoint outside the run folder
        writable_file(opts.checkpoint, "--checkpoint")
    if opts.output and (args.classify or args.export):
        writable_file(opts.output, "--output")


# -----------------------------------------------------------------------------
# Modes

MODES = ("infer", "classify", "generate", "eval")  # the modes that use a trained model (Task.modes)


def options(args, task: str, argv: list[str]) -> Options:
    """The argparse namespace as typed Options, with the defaults that depend on the task and mode filled in."""
    values = {f.name: getattr(args, f.name) for f in fields(Options) if getattr(args, f.name, None) is not None}
    paths = on_rank0(lambda: run_paths(args, task)) if args.train or args.compare else {
        "checkpoint": args.checkpoint or os.path.join(runs.CHECKPOINTS, f"{task}.pt"),
        "out_dir": args.out_dir or os.path.join(runs.RUNS, task)}
    return Options(**{**values, **paths, "task": task, "top_k": args.top_k or 0, "resume": bool(args.resume),
                      "command": " ".join(["main.py", *argv])})


def on_rank0(decide):
    """decide() on rank 0, its answer (or its one-line error) shared with every torchrun process, so that all of
    them write to the run folder rank 0 chose (a timestamp, the checks of what exists) or stop alike."""
    rank, world = dist_info()
    if world == 1:
        return decide()
    answer = [None]
    if rank == 0:
        try:
            answer = [decide()]
        except DataError as e:
            answer = [DataError(str(e))]
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], DataError):
        raise answer[0]
    return answer[0]


def run_paths(args, task: str) -> dict:
    """Where a training run writes: its own run folder (new, or the one --resume continues), its best model
    there (or --checkpoint), and checkpoints/<task>.pt to publish to when it finishes (not with --checkpoint)."""
    if args.resume and args.out_dir is None and args.checkpoint is None:
        out_dir = runs.resume_dir(task, args.resume)
    elif isinstance(args.resume, str):
        raise DataError(f"--resume {args.resume}: a run name goes without --out_dir/--checkpoint (use --resume "
                        "alone to continue the run in those)")
    else:
        out_dir = args.out_dir or runs.new_run_dir(task, args.name)
    if args.resume and runs.finished(out_dir):
        raise DataError(f"--resume: the run in {out_dir} finished (its summary.json is there); nothing to go on with")
    if args.out_dir and not args.resume and runs.holds_run(out_dir):
        raise DataError(f"--out_dir {out_dir}: holds a run already (its model and log would be replaced); pick "
                        "another folder, or --resume to go on with it")
    publish = os.path.join(runs.CHECKPOINTS, f"{task}.pt") if args.checkpoint is None and args.train else None
    return {"out_dir": out_dir, "checkpoint": args.checkpoint or os.path.join(out_dir, runs.MODEL),
            "publish": publish}


def config_flags(args) -> dict:
    """The training settings the command line gave as flags (resolve_config puts them over the preset)."""
    return {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}


def check_flags(args) -> None:
    """Flag combinations and values that no mode accepts."""
    if args.resume and not args.train:
        raise DataError("--resume works with --train (it goes on with an interrupted training run)")
    if args.init_from is not None and not args.train:
        raise DataError("--init_from works with --train (it starts a new MoE from a dense checkpoint)")
    if args.init_from is not None and args.resume:
        raise DataError("--init_from and --resume: a resumed run goes on from its own weights; use one of them")
    if args.beam < 1:
        raise DataError(f"--beam {args.beam}: must be >= 1")
    if not 1 <= args.num_candidates <= 16:
        raise DataError(f"--num_candidates {args.num_candidates}: must be 1-16")
    if not math.isfinite(args.length_penalty):
        raise DataError(f"--length_penalty {args.length_penalty}: must be a finite number")
    for flag in ("word_prior", "fusion"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise DataError(f"--{flag} {value}: must be a number >= 0")
    if args.backend == "onnx" and not (args.task == "cls" and (args.infer or args.classify)):
        raise DataError("--backend onnx works with --infer/--classify --task cls (export first: --export onnx)")


def run(args, argv: list[str]) -> int:
    device = pick_device(args.device)
    if args.serve:
        return server.serve(options(args, "cls", argv), device)
    if args.analyze and args.task is None and args.checkpoint:
        args.task = analyze.checkpoint_task(args.checkpoint)
    args.task = args.task or ("lm" if args.generate or args.eval else "cls")
    task = TASKS[args.task]
    # asked before any process group exists: no process is spawned beside torchrun's gloo threads
    version = runs.version() if args.train or args.compare else ""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not args.train:
            raise DataError("torchrun runs --train only (one process per device)")
        device = init_distributed(args.device)
    mode = next((m for m in MODES if getattr(args, m)), None)
    if mode and mode not in task.modes:
        raise DataError(f"--{mode} is for --task {' or '.join(tasks_with(mode))}; --task {task.name} has "
                        f"{', '.join('--' + m for m in task.modes)}")
    check_flags(args)
    opts = replace(options(args, task.name, argv), version=version)
    check_outputs(args, opts)
    if args.train or args.compare:
        train(task, args, opts, device)
    elif mode:
        task.show(mode, task.run_mode(mode, opts, device), opts)
    elif args.export:
        print(json.dumps(onnx_export.export(task, opts), ensure_ascii=False))
    elif args.analyze:
        print(json.dumps(analyze.analyze(task, opts, device), ensure_ascii=False))
    return 0


def train(task, args, opts: Options, device) -> None:
    """--train / --compare: resolve the configs, then the pipeline; the JSON summary is the last line."""
    preset, model_cfg, train_cfg = resolve_config(task.name, args.preset, config_flags(args), args.set)
    check_training_dtype(train_cfg.dtype, device)  # before a run folder is made
    # the checkpoint says which dtype and compile mode the run used
    train_cfg = replace(train_cfg, dtype=resolve_dtype(train_cfg.dtype, device),
                        compile=resolve_compile(train_cfg.compile, device))
    rank, world = dist_info()
    if train_cfg.expert_parallel:
        check_expert_parallel(model_cfg.num_experts, world)
    if world > 1:  # --batch_size is per process; the config (and checkpoint) records the global batch
        train_cfg = replace(train_cfg, batch_size=train_cfg.batch_size * world)
        opts = replace(opts, quiet=opts.quiet or rank > 0)
    if not opts.quiet:
        print(f"config ({task.name}/{preset}, device {device}"
              f"{f', {world} processes' if world > 1 else ''}):", file=sys.stderr)
        print(json.dumps({"model": asdict(model_cfg), "train": asdict(train_cfg)}, ensure_ascii=False),
              file=sys.stderr)
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: the resume state is saved and the best checkpoint kept
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    new_folder = rank == 0 and not os.path.exists(opts.out_dir)
    try:
        with contextlib.ExitStack() as locks:
            if rank == 0:  # one writer per run folder and per checkpoint; the kernel releases a killed run's lock
                locks.enter_context(exclusive(os.path.join(opts.out_dir, ".lock"), f"run folder {opts.out_dir}"))
                if args.train:
                    locks.enter_context(exclusive(opts.checkpoint + ".lock", f"--checkpoint {opts.checkpoint}"))
                    if not opts.resume:  # an earlier model at this path is kept, not overwritten
                        runs.keep_aside(opts.checkpoint)
            summary = (pipeline.compare if args.compare else pipeline.train)(task, model_cfg, train_cfg, opts, device)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if new_folder and os.path.isdir(opts.out_dir) and not os.listdir(opts.out_dir):
            os.rmdir(opts.out_dir)  # a run that stopped before writing anything leaves no empty folder
    if rank == 0:
        print(json.dumps(summary, ensure_ascii=False))
    if world > 1:  # every process leaves together: none tears the process group down while rank 0 still scores
        dist.barrier()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except DataError as e:
        # errors the user can cause: one line, no traceback, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not e.filename:
            raise
        # a user path that went bad mid-run (disk full, removed folder): one line too
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the best checkpoint so far (if any) is intact", file=sys.stderr)
        return 130  # also for SIGTERM: the run did not finish
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # clean shutdown of a torchrun worker


if __name__ == "__main__":
    sys.exit(main())
