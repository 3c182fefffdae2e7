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
    python main.py --serve                            web page + JSON API on http://127.0.0.1:8000
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
import tempfile
from dataclasses import asdict, fields, replace

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("cls", "lm", "seq2seq")


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
    g.add_argument("--checkpoint", default=None, help="model file written by --train, read by the other modes "
                                                       "(default checkpoints/<task>.pt)")
    g.add_argument("--out_dir", default=None, help="where logs, plots and predictions go (default runs/<task>/)")
    g.add_argument("--data", default=None,
                   help="your own data. cls: a csv/tsv/jsonl/parquet file (split 80/10/10) or a directory with train, "
                        "val (or dev) and test files; lm: a UTF-8 text file, one paragraph a line, or a table's "
                        "--text_col (split 90/5/5 in order); seq2seq: a csv/tsv/jsonl/parquet file with source and "
                        "target (or question and answer) columns (shuffled, split 90/5/5)")
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
    g.add_argument("--resume", action="store_true",
                   help="--train: continue the interrupted run from <checkpoint>.last.pt with its optimizer, "
                        "schedule, scaler, step, RNG and data position (cls: in the phase it stopped in)")
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
                   help="any field of the task's model config (models.py) or of TrainConfig (trainer.py), e.g. "
                        "--set d_model=256 --set noisy_gate=false")
    return p


# -----------------------------------------------------------------------------
# Config resolution: defaults -> preset -> flags

def coerce(key: str, value: str, default):
    """Parse a --set value to the type of the field's default."""
    from data import DataError
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, (int, float, str)):
            return type(default)(value)
        return json.loads(value)
    except ValueError:
        raise DataError(f"--set {key}={value}: expected a {type(default).__name__}") from None


def budget_shape(model_cfg, train_cfg, time_budget: float, explicit: set[str]):
    """Under --time_budget: the recipe's batch size (and context length, where its budget_batch entry gives one)
    for the budget; short runs need many small steps (docs/experiments.md). The `explicit` keys (given by a flag
    or --set) win."""
    fits = [entry for entry in train_cfg.budget_batch if time_budget < entry[0]]
    if not fits:
        return model_cfg, train_cfg
    _, batch, *context = fits[0]
    if "batch_size" not in explicit:
        train_cfg = replace(train_cfg, batch_size=int(batch))
    if context and "max_len" not in explicit:
        model_cfg = replace(model_cfg, max_len=int(context[0]))
    return model_cfg, train_cfg


def resolve_config(task: str, preset_name: str | None, args=None):
    """(preset name, ModelConfig, TrainConfig) for a task; `args` (parsed flags) override the preset."""
    from data import DataError
    from models import MODEL_CONFIGS
    from trainer import TASK_TRAIN_FIELDS, TrainConfig
    with open(os.path.join(HERE, "configs.json"), encoding="utf-8") as f:
        presets = json.load(f)[task]
    preset_name = preset_name or presets.get("_default", "default")
    if preset_name not in presets or preset_name.startswith("_"):
        names = ", ".join(k for k in presets if not k.startswith("_"))
        raise DataError(f"configs.json: no preset {preset_name!r} for task {task} (have: {names})")
    values = dict(presets[preset_name])
    flag_keys = ("epochs", "max_steps", "time_budget", "batch_size", "lr", "num_experts", "top_k", "num_layers",
                 "dtype", "seed", "tokenizer", "compile", "optimizer", "init_from")
    explicit = {k for k in flag_keys if getattr(args, k, None) is not None}  # keys the command line gave
    values.update({k: getattr(args, k) for k in explicit})
    for flag in ("epochs", "max_steps", "time_budget"):  # 0 in a config means "no limit"; as a flag it is a slip
        if getattr(args, flag, None) is not None and not getattr(args, flag) > 0:
            raise DataError(f"--{flag} {getattr(args, flag)}: must be > 0")
    if getattr(args, "time_budget", None) and getattr(args, "max_steps", None) is None:
        values["max_steps"] = 0  # "train for N seconds": the clock, not the preset's step count, ends the run
    model_fields = {f.name: f for f in fields(MODEL_CONFIGS[task])}
    train_fields = {f.name: f for f in fields(TrainConfig)}
    # whose a field is, when it is not this task's: another model's, or another task's training setting
    owner = {f.name: f"the {t} model" for t, c in MODEL_CONFIGS.items() for f in fields(c)}
    owner.update({name: f"--task {t} training" for t, names in TASK_TRAIN_FIELDS.items() for name in names})
    mine = set(model_fields) | (set(train_fields) - {k for t, ks in TASK_TRAIN_FIELDS.items() if t != task for k in ks})

    def check_known(key: str, where: str) -> None:
        if key in mine:
            return
        if key in owner:
            raise DataError(f"{where}{key}: a setting of {owner[key]}, not of --task {task}")
        raise DataError(f"{where}{key}: unknown key; known for --task {task}: {', '.join(sorted(mine))}")

    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--set {item!r}: expected KEY=VALUE")
        check_known(key, "--set ")
        values[key] = coerce(key, value, (model_fields.get(key) or train_fields[key]).default)
        explicit.add(key)
    for key in sorted(values):
        check_known(key, f"configs.json {task}.{preset_name}: ")
    try:
        model_cfg = MODEL_CONFIGS[task](**{k: v for k, v in values.items() if k in model_fields})
        train_cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
        if getattr(args, "time_budget", None):
            model_cfg, train_cfg = budget_shape(model_cfg, train_cfg, args.time_budget, explicit)
    except (TypeError, ValueError) as e:
        raise DataError(f"config {task}.{preset_name}: {e}") from None
    return preset_name, model_cfg, train_cfg


# -----------------------------------------------------------------------------
# Output paths: checked before any work, so a long run never dies at its last write

def writable_dir(path: str, flag: str, shown: str | None = None) -> None:
    """Create `path` if needed and prove a file can be written in it, or fail in one line naming the flag."""
    from data import DataError
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{flag} {shown or path}: {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check"):
            pass
    except OSError as e:
        raise DataError(f"{flag} {shown or path}: cannot write there ({e.strerror or e})") from None


def writable_file(path: str, flag: str) -> None:
    from data import DataError
    if os.path.isdir(path):
        raise DataError(f"{flag} {path}: is a directory, not a file")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag, shown=path)


@contextlib.contextmanager
def checkpoint_lock(path: str):
    """<checkpoint>.lock holds the pid of the run writing `path`: a second live run is refused (it would
    silently overwrite the first one's model); a lock left by a killed run is taken over."""
    from data import DataError
    lock = path + ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(lock, encoding="utf-8") as f:
                    pid = int(f.read().strip())
                if pid <= 0:
                    raise ValueError
                os.kill(pid, 0)  # signal 0: is that process alive?
            except (ProcessLookupError, ValueError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)  # stale (its run is gone) or unreadable
                continue
            except PermissionError:
                pass  # alive, another user's
            raise DataError(f"--checkpoint {path}: another run (pid {pid}) is writing it; wait for it or pick "
                            f"another --checkpoint (remove {lock} if that run is gone)") from None
    else:
        raise DataError(f"--checkpoint {path}: cannot take {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        os.unlink(lock)


def check_outputs(args) -> None:
    """The files and folders this mode will write."""
    if args.train or args.compare:
        writable_file(args.checkpoint, "--checkpoint")
    if args.train or args.compare or args.classify or args.generate or args.analyze:
        writable_dir(args.out_dir, "--out_dir")
    if args.output and (args.classify or args.export):
        writable_file(args.output, "--output")


# -----------------------------------------------------------------------------
# Modes

def run(args) -> int:
    import pipeline
    import task_cls
    import task_lm
    import task_s2s
    from data import DataError
    from trainer import dist_info, init_distributed, pick_device, resolve_compile, resolve_dtype

    if args.serve:
        import server
        return server.serve(args)
    if args.analyze and args.task is None and args.checkpoint:
        import analyze
        args.task = analyze.checkpoint_task(args.checkpoint)
    args.task = args.task or ("lm" if args.generate or args.eval else "cls")
    task = {"cls": task_cls, "lm": task_lm, "seq2seq": task_s2s}[args.task]
    args.checkpoint = args.checkpoint or os.path.join("checkpoints", f"{args.task}.pt")
    args.out_dir = args.out_dir or os.path.join("runs", args.task)
    device = pick_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not args.train:
            raise DataError("torchrun runs --train only (one process per device)")
        device = init_distributed(args.device)
    if args.task == "lm" and (args.infer or args.classify):
        raise DataError("--infer and --classify are for --task cls; use --generate or --eval with --task lm")
    if args.task != "lm" and (args.generate or args.eval):
        raise DataError("--generate and --eval are for --task lm")
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

    check_outputs(args)
    if args.train or args.compare:
        preset, model_cfg, train_cfg = resolve_config(args.task, args.preset, args)
        # the checkpoint says which dtype and compile mode the run used
        train_cfg = replace(train_cfg, dtype=resolve_dtype(train_cfg.dtype, device),
                            compile=resolve_compile(train_cfg.compile, device))
        rank, world = dist_info()
        if train_cfg.expert_parallel:
            check_expert_parallel(model_cfg.num_experts, world)
        if world > 1:  # --batch_size is per process; the config (and checkpoint) records the global batch
            train_cfg = replace(train_cfg, batch_size=train_cfg.batch_size * world)
            args.quiet = args.quiet or rank > 0
        if not args.quiet:
            print(f"config ({args.task}/{preset}, device {device}"
                  f"{f', {world} processes' if world > 1 else ''}):", file=sys.stderr)
            print(json.dumps({"model": asdict(model_cfg), "train": asdict(train_cfg)}, ensure_ascii=False),
                  file=sys.stderr)
        # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: the resume state is saved and the best checkpoint kept
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        lock = checkpoint_lock(args.checkpoint) if args.train and rank == 0 else contextlib.nullcontext()
        try:
            with lock:
                summary = (pipeline.compare if args.compare else pipeline.train)(task, model_cfg, train_cfg, args,
                                                                                   device)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rank == 0:
            print(json.dumps(summary, ensure_ascii=False))
    elif args.infer and args.task == "seq2seq":
        result = task_s2s.infer(args, device)
        if args.json or args.num_candidates == 1:
            print(json.dumps(result, ensure_ascii=False) if args.json else result["pred"])
        else:
            for i, c in enumerate(result["candidates"], 1):
                print(f"{i}. {c['text']}  ({c['score']:.3f})")
    elif args.infer:
        result = task_cls.infer(args, device)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            unsure = (f"  (unsure: below the {result['unsure_below']:.2f} confidence at which validation answers "
                      f"are right {task_cls.CONFIDENT_ACCURACY:.0%} of the time)" if result["unsure"] else "")
            print(f"label: {result['label']}{unsure}")
            for name, prob in sorted(result["probs"].items(), key=lambda kv: -kv[1]):
                print(f"  {name:<12} {prob:.4f}")
    elif args.classify:
        if not args.input:
            raise DataError("--classify needs --input FILE")
        print(json.dumps(task.classify(args, device), ensure_ascii=False))
    elif args.generate:
        if (args.max_new_tokens < 1 or args.num_samples < 1 or not 0 < args.top_p <= 1
                or not 0 <= args.temperature < math.inf or (args.top_k or 0) < 0):
            raise DataError("--generate: need max_new_tokens >= 1, num_samples >= 1, 0 < top_p <= 1, "
                            "0 <= temperature < inf, top_k >= 0")
        args.sample_top_k = args.top_k or 0
        summary = task_lm.generate(args, device)
        print(json.dumps(summary, ensure_ascii=False), file=sys.stderr)
    elif args.export:
        import onnx_export
        print(json.dumps(onnx_export.export(args), ensure_ascii=False))
    elif args.analyze:
        import analyze
        print(json.dumps(analyze.analyze(args, device), ensure_ascii=False))
    elif args.eval:
        if not args.input:
            raise DataError("--eval needs --input FILE")
        print(json.dumps(task_lm.eval_file(args, device), ensure_ascii=False))
    return 0


def check_expert_parallel(num_experts: int, world: int) -> None:
    """expert_parallel=true shares each layer's experts out among the torchrun processes: there must be some."""
    from data import DataError
    if world == 1:
        raise DataError("--set expert_parallel=true: run under torchrun with 2+ processes "
                        "(torchrun --nproc_per_node=2 main.py --train ...)")
    if num_experts == 0 or num_experts % world:
        raise DataError(f"--set expert_parallel=true: num_experts={num_experts} must be a positive multiple of the "
                        f"{world} processes")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from data import DataError
    try:
        return run(args)
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
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # clean shutdown of a torchrun worker


if __name__ == "__main__":
    sys.exit(main())
