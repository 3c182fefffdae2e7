"""Every config of the project in one place: the MoE layer's fields, one config per model, the training config,
and the presets of configs.json resolved with the command line's flags (dataclass defaults -> preset -> flags).
The resolved configs are what a checkpoint stores."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import ClassVar

from errors import DataError

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class MoEConfig:
    """The MoE layer's fields, shared by every model's config."""
    num_experts: int = 8          # 0: dense FFN, same *active* parameters (hidden = (top_k + shared_experts) * d_ff)
    top_k: int = 2
    shared_experts: int = 0       # experts every token goes through besides its top_k routed ones (DeepSeekMoE)
    moe_layers: str = "all"       # "all", "none", "odd" (1, 3, ...) or a comma list of layer indices
    noisy_gate: bool = True       # noisy top-k (Shazeer et al. 2017); noise only in training mode
    noise_init: float = 0.05      # router noise std at init; log(2) is Shazeer's (zero-init softplus), which
                                  # drowns the initial logits (std ~0.23) and slows early learning
    norm_topk_prob: bool = True   # renormalise the K router weights to sum to 1 (never for top_k=1)
    capacity_factor: float = 0.0  # 0: dropless; else each expert keeps ceil(cf * N * K / E) assignments
    routing: str = "token"        # "token": each token picks its top_k experts; "expert": expert choice (Zhou et
                                  # al. 2022), each expert picks its top ceil(N * top_k / E) tokens of the batch:
                                  # balanced by construction, but a token's experts depend on the other tokens,
                                  # so encoders only (the classifier, the seq2seq encoder; refused for the LM)
    balance: str = "loss"         # how experts are kept busy alike: "loss" (the Switch loss below) or "bias"
                                  # (auxiliary-loss-free: a per-expert bias on the selection scores, see MoE)
    bias_rate: float = 0.001      # balance="bias": the bias step per optimizer step (Wang et al. 2024's u)
    balance_coef: float = 0.01    # Switch-Transformer load-balancing loss weight (balance="loss")
    z_coef: float = 0.001         # router z-loss weight (ST-MoE)
    moe_impl: str = "auto"        # expert computation: "grouped" (F.grouped_mm), "loop" (per expert, the
                                  # reference) or "auto" (measured choice by batch size, see Experts)


@dataclass
class ModelConfig(MoEConfig):
    """What every model has: the Transformer's shape and the MoE fields. Each task's model has its own
    subclass below with only the fields it reads; all are stored in the checkpoint (dataclasses.asdict)."""
    vocab_size: int = 4096        # BPE target size (256 bytes + merges + specials); set from the tokenizer
    max_len: int = 128            # longest sequence, [CLS] and [SEP] included
    d_model: int = 128
    n_heads: int = 4
    num_layers: int = 2           # 0 (classifier): pooled embeddings -> one MoE layer -> head
    d_ff: int = 256               # hidden width of one expert
    dense_ff: int = 0             # hidden width of the dense FFN layers (0: (top_k + shared_experts) * d_ff, the
                                  # active width of an MoE layer; upcycling sets it to the dense model's width)
    dropout: float = 0.1
    rope: ClassVar[bool] = False  # rotary positions: a field of the seq2seq model only

    def __post_init__(self):
        for name, lo in (("vocab_size", 1), ("max_len", 2), ("d_model", 1), ("n_heads", 1), ("d_ff", 1),
                         ("dense_ff", 0), ("num_layers", 0), ("num_experts", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {lo}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts={self.shared_experts} must be >= 0")
        if self.noisy_gate and not self.noise_init > 0:
            raise ValueError(f"noise_init={self.noise_init} must be > 0 (or set noisy_gate=false)")
        if self.balance not in ("loss", "bias"):
            raise ValueError(f"balance={self.balance!r} must be 'loss' or 'bias'")
        if self.routing not in ("token", "expert"):
            raise ValueError(f"routing={self.routing!r} must be 'token' or 'expert'")
        if self.routing == "expert" and self.balance == "bias":
            raise ValueError("routing='expert' is balanced by construction (every expert takes the same number of "
                             "tokens); balance='bias' is for routing='token'")
        if not (math.isfinite(self.bias_rate) and self.bias_rate >= 0):
            raise ValueError(f"bias_rate={self.bias_rate} must be a number >= 0")
        if self.moe_impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"moe_impl={self.moe_impl!r} must be 'auto', 'grouped' or 'loop'")
        for name in ("capacity_factor", "balance_coef", "z_coef"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)} must be a number >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.moe_layers not in ("all", "none", "odd"):
            indices = [i.strip() for i in self.moe_layers.split(",")]
            if not all(i.isdigit() and int(i) < self.depth() for i in indices):
                raise ValueError(f"moe_layers={self.moe_layers!r} must be all, none, odd or layer indices "
                                 f"below {self.depth()} like 0,2")

    def depth(self) -> int:
        """The deepest stack's number of blocks (what moe_layers indexes)."""
        return self.num_layers

    def dense_hidden(self) -> int:
        """Hidden width of a dense FFN layer: by default an MoE layer's active width, so a dense twin
        (num_experts=0) has the same active parameters per token."""
        return self.dense_ff or self.d_ff * (self.top_k + self.shared_experts)

    def is_moe_layer(self, i: int) -> bool:
        if self.num_experts == 0 or self.moe_layers == "none":
            return False
        if self.moe_layers == "all":
            return True
        if self.moe_layers == "odd":
            return i % 2 == 1
        return i in {int(j) for j in self.moe_layers.split(",")}


@dataclass
class ClassifierConfig(ModelConfig):
    """The MiniBERT-MoE classifier (--task cls)."""
    pooling: str = "cls"          # "cls" (the [CLS] position) or "mean" (over real tokens)
    ngram_buckets: int = 0        # a linear "wide" part over hashed token 1-3-grams, added to the logits
                                  # (fastText / wide & deep); this many hash buckets (0: none)
    wide: bool = False            # wide & deep: a linear model over TF-IDF character 1-3-grams (wide.py), started
                                  # as the LinearSVC fitted on the training split, plus the encoder's logits times
                                  # a scale that starts at 0
    wide_vocab: int = 0           # its n-gram vocabulary size: set from the training split (not a user setting)
    wide_fit: str = "auto"        # how the linear part is fitted: "svm", the LinearSVC of the TF-IDF baseline;
                                  # "nbsvm", the same features times their naive-Bayes log-count ratios (NBSVM,
                                  # Wang & Manning 2012), folded back into the weights (wide.fit_linear); "auto":
                                  # both, the one more accurate on the validation split kept
    deep_training: str = "own"    # wide & deep: what the deep part learns from. "joint": the loss of the summed
                                  # logits (it learns the linear model's residual on the training texts, which the
                                  # linear model fits too well); "own": its own logits' cross-entropy, the summed
                                  # logits' loss training only the scale; "both": the two losses added
    num_classes: int = 2
    type_vocab_size: int = 2      # segment embeddings (sentence A / B)

    def __post_init__(self):
        super().__post_init__()
        for name, lo in (("num_classes", 1), ("ngram_buckets", 0), ("type_vocab_size", 1),
                         ("wide_vocab", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {lo}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling={self.pooling!r} must be 'cls' or 'mean'")
        if self.deep_training not in ("joint", "own", "both"):
            raise ValueError(f"deep_training={self.deep_training!r} must be joint, own or both")
        if self.wide_fit not in ("auto", "svm", "nbsvm"):
            raise ValueError(f"wide_fit={self.wide_fit!r} must be auto, svm or nbsvm")


@dataclass
class LMConfig(ModelConfig):
    """The decoder-only language model (--task lm): causal by construction, no fields of its own."""

    def __post_init__(self):
        super().__post_init__()
        if self.routing == "expert":
            raise ValueError("routing='expert' (expert choice) lets a token's experts depend on the tokens after "
                             "it, which a causal language model must not see; use routing='token'")


@dataclass
class Seq2SeqConfig(ModelConfig):
    """The encoder-decoder (--task seq2seq); num_layers is the encoder's depth."""
    decoder_layers: int = 0       # decoder depth (0: same as num_layers); its MoE layers route by token
                                  # choice whatever `routing` says (expert choice would see future tokens)
    rope: bool = False            # rotary positions in self- and cross-attention instead of position tables, so
                                  # "target t looks at source t" is one relative pattern to learn

    def __post_init__(self):
        if self.decoder_layers < 0:
            raise ValueError(f"decoder_layers={self.decoder_layers} must be >= 0")
        super().__post_init__()

    def depth(self) -> int:
        return max(self.num_layers, self.decoder_layers)


MODEL_CONFIGS = {"cls": ClassifierConfig, "lm": LMConfig, "seq2seq": Seq2SeqConfig}


def model_config(task: str, values: dict) -> ModelConfig:
    """A checkpoint's saved model config as its task's config class. Checkpoints written while one config
    served every model carry the other models' fields (and a dead `causal`); this model never read them, so
    they are dropped."""
    cls = MODEL_CONFIGS[task]
    own = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in own})


# TrainConfig fields that only one task reads (main.py refuses them for the others)
TASK_TRAIN_FIELDS = {"cls": ("pretrain_epochs", "pretrain_steps", "pretrain_seconds", "pretrain_lr",
                             "pretrain_optimizer", "ngram_lr", "wide_lr", "pretrain_news", "extra_labelled",
                             "pretrain_shipped"),
                     "seq2seq": ("lexicon_pairs",)}


ENDLESS_EPOCHS = 10 ** 6  # the epochs of a run that only its time budget ends (a --compare variant held to seconds)


@dataclass
class TrainConfig:
    """How to train; stored in the checkpoint next to the model config."""
    epochs: int = 10
    max_steps: int = 0            # 0: epochs * steps per epoch
    time_budget: float = 0.0      # seconds of training (0: no limit); the schedule then follows the clock
    batch_size: int = 64
    budget_batch: tuple = ()      # ((seconds, batch[, context]), ...): under --time_budget below `seconds`, the
                                  # batch size and, if given, the context length max_len (the first entry that fits;
                                  # measured per recipe, see configs.json); --batch_size / --set max_len= win
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.05    # share of the run spent in linear warmup
    weight_decay: float = 0.01    # never applied to norms, biases, embeddings
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    dtype: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast) | fp16 (autocast +
                                  # GradScaler, CUDA only); resolved to one of the last three when training starts
    accum_steps: int = 1          # micro-batches per optimizer step (gradient accumulation)
    grad_checkpoint: bool = False # recompute each block's activations in backward (less memory, ~30% slower)
    optimizer: str = "adamw"      # adamw | muon (Muon for the blocks' hidden matrices, AdamW for the rest)
    muon_steps: int = 5           # Newton-Schulz iterations of each Muon update (3 trained both the LM MoE and its
                                  # dense twin ~0.03 nats better at --time_budget 75: docs/experiments.md, Step 10)
    muon_experts: bool = True     # Muon for the expert stacks too (false: AdamW for them, at the same lr)
    adamw_experts_below: float = 0.0  # under --time_budget below this many seconds, muon_experts=false: at the LM's
                                  # short-budget batch their Newton-Schulz costs more steps than it gains, at its
                                  # full preset it pays (docs/experiments.md, Step 10); 0: never
    compile: str = "auto"         # torch.compile the training step: auto (on for CUDA, off on CPU: measured, see
                                  # resolve_compile) | on | off; resolved when training starts
    halt_after: int = 0           # stop after this many steps as if interrupted (the schedule still plans for
                                  # max_steps); --resume goes on from there
    tokenizer: str = "bpe"        # bpe | bpe_hanzi | char
    tokenizer_sample_mb: float = 64.0  # the tokenizer learns from an even sample of this many MB of the training
                                  # text (0: all of it), so a bigger corpus costs no more tokenizer time
    seed: int = 1337
    pretrain_epochs: int = 0      # masked-LM pretraining of the encoder before fine-tuning (0: none)
    pretrain_steps: int = 0       # step limit of that phase (0: pretrain_epochs decide)
    pretrain_seconds: float = 0.0 # time limit of that phase (0: none)
    pretrain_lr: float = 0.0      # 0: same as lr
    pretrain_optimizer: str = ""  # adamw | muon for that phase ("": same as optimizer)
    ngram_lr: float = 0.0         # learning rate of the classifier's hashed n-gram weights (0: same as lr)
    wide_lr: float = 0.0          # learning rate of the TF-IDF linear part's weights (0: frozen at the fitted
                                  # linear model; the deep part and its scale learn around it)
    pretrain_news: bool = True    # pretrain on the People's Daily corpus too, not only the training texts
    pretrain_shipped: bool = False  # pretrain on every review text the project ships too (data.shipped_texts),
                                  # less each text of the val and test splits (theirs, or those of --data)
    extra_labelled: bool = False  # built-in reviews: the shipped reviews of other domains (food delivery, fruit,
                                  # clothes ...; data.EXTRA_SENTIMENT) join the training split; val/test stay
    lexicon_pairs: int = 0        # seq2seq on the built-in pinyin data: word-list pairs from jieba's dictionary
                                  # added to the training pairs (pinyin.lexicon_pairs); ignored with --data
    init_from: str = ""           # sparse upcycling: a dense checkpoint of the same task whose weights start the
                                  # MoE (each expert a copy of its FFN; moe.upcycle); "" trains from scratch
    upcycle_noise: float = 0.01   # noise on the upcycled experts' weights, times each matrix's std
    expert_parallel: bool = False # under torchrun: each process holds E/P experts of every MoE layer and the
                                  # tokens travel to them (expert_parallel.py); the rest stays data parallel
    log_every: int = 10           # steps between metrics-log rows
    eval_every: int = 0           # steps between evaluations (0: once per epoch)

    def __post_init__(self):
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype={self.dtype!r} must be auto, fp32, bf16 or fp16")
        for name, allowed in (("optimizer", ("adamw", "muon")), ("pretrain_optimizer", ("", "adamw", "muon"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be adamw or muon")
        if self.tokenizer not in ("bpe", "bpe_hanzi", "char"):
            raise ValueError(f"tokenizer={self.tokenizer!r} must be bpe, bpe_hanzi or char")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must be two numbers in [0, 1), like [0.9, 0.95]")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile={self.compile!r} must be auto, on or off")
        for name in ("batch_size", "accum_steps", "log_every", "muon_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("epochs", "max_steps", "eval_every", "halt_after", "pretrain_epochs", "pretrain_steps",
                     "lexicon_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a number > 0")
        for name in ("time_budget", "adamw_experts_below", "pretrain_seconds", "pretrain_lr", "ngram_lr", "wide_lr",
                     "weight_decay", "grad_clip", "label_smoothing", "warmup_ratio", "min_lr_ratio", "upcycle_noise",
                     "tokenizer_sample_mb"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)} must be a number >= 0")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} must be <= 1")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be < 1")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("epochs=0 and max_steps=0: nothing to train")
        self.betas = tuple(self.betas)

        def is_entry(entry) -> bool:  # [seconds > 0, batch >= 1] or [seconds, batch, context >= 1]
            return (isinstance(entry, (list, tuple)) and len(entry) in (2, 3)
                    and all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in entry)
                    and entry[0] > 0 and all(int(n) == n >= 1 for n in entry[1:]))

        if not isinstance(self.budget_batch, (list, tuple)) or not all(map(is_entry, self.budget_batch)):
            raise ValueError(f"budget_batch={json.dumps(self.budget_batch)} must be [seconds, batch] or "
                             "[seconds, batch, context] entries like [[120, 8], [360, 32, 64]]")
        self.budget_batch = tuple(tuple(entry) for entry in self.budget_batch)


def coerce(key: str, value: str, default):
    """Parse a --set value to the type of the field's default."""
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
    for the budget, and its optimizer for the experts (adamw_experts_below); short runs need many small, cheap
    steps (docs/experiments.md). The `explicit` keys (given by a flag or --set) win."""
    if time_budget < train_cfg.adamw_experts_below and "muon_experts" not in explicit:
        train_cfg = replace(train_cfg, muon_experts=False)
    fits = [entry for entry in train_cfg.budget_batch if time_budget < entry[0]]
    if not fits:
        return model_cfg, train_cfg
    _, batch, *context = fits[0]
    if "batch_size" not in explicit:
        train_cfg = replace(train_cfg, batch_size=int(batch))
    if context and "max_len" not in explicit:
        model_cfg = replace(model_cfg, max_len=int(context[0]))
    return model_cfg, train_cfg


# the training settings that have a flag of their own (the rest: --set key=value)
FLAG_KEYS = ("epochs", "max_steps", "time_budget", "batch_size", "lr", "num_experts", "top_k", "num_layers", "dtype",
             "seed", "tokenizer", "compile", "optimizer", "init_from")


def resolve_config(task: str, preset_name: str | None = None, flags: dict | None = None, sets=()):
    """(preset name, ModelConfig, TrainConfig) for a task: the preset, then `flags` ({FLAG_KEYS key: value}, the
    ones the command line gave), then `sets` (the "key=value" strings of --set)."""
    with open(os.path.join(HERE, "configs.json"), encoding="utf-8") as f:
        presets = json.load(f)[task]
    preset_name = preset_name or presets.get("_default", "default")
    if preset_name not in presets or preset_name.startswith("_"):
        names = ", ".join(k for k in presets if not k.startswith("_"))
        raise DataError(f"configs.json: no preset {preset_name!r} for task {task} (have: {names})")
    values = dict(presets[preset_name])
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    explicit = set(flags)  # keys the command line gave
    values.update(flags)
    for flag in ("epochs", "max_steps", "time_budget"):  # 0 in a config means "no limit"; as a flag it is a slip
        if flag in flags and not flags[flag] > 0:
            raise DataError(f"--{flag} {flags[flag]}: must be > 0")
    if flags.get("time_budget") and "max_steps" not in flags:
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

    for item in sets:
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
        if flags.get("time_budget"):
            model_cfg, train_cfg = budget_shape(model_cfg, train_cfg, flags["time_budget"], explicit)
    except (TypeError, ValueError) as e:
        raise DataError(f"config {task}.{preset_name}: {e}") from None
    return preset_name, model_cfg, train_cfg


@dataclass(frozen=True)
class Options:
    """What the command line asked for, typed, with main.py's defaults filled in (task, checkpoint, out_dir).
    main.py builds it once from argparse; everything below main.py reads this, never the argparse namespace.
    Training hyperparameters given as flags are already inside the resolved configs (resolve_config)."""
    task: str = "cls"
    checkpoint: str = ""          # the model file --train writes and the other modes read
    out_dir: str = ""             # logs, plots, predictions
    quiet: bool = False
    # data
    data: str | None = None       # --data: the user's file or folder instead of the built-in corpus
    text_col: str = "text"
    label_col: str = "label"
    # one text or one file
    text: str | None = None
    input: str | None = None
    output: str | None = None
    json: bool = False
    backend: str = "torch"        # torch | onnx (--infer/--classify of a classifier)
    # training runs
    resume: bool = False          # go on with the run in out_dir (main.py found it)
    publish: str | None = None    # a finished run's best model is copied here (checkpoints/<task>.pt)
    command: str = ""             # the command line and the project version (runs.version), for the
    version: str = ""             # checkpoint's provenance
    tensorboard: bool = False
    mlflow: bool = False
    # generation (--generate)
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0                # sample from the K likeliest tokens (0: all)
    top_p: float = 0.95
    num_samples: int = 1
    stop_at_eos: bool = False
    seed: int = 1337
    # conversion (--infer/--classify of a seq2seq model)
    beam: int = 4
    num_candidates: int = 1
    length_penalty: float = 1.0
    word_prior: float | None = None
    fusion: float | None = None
    # --serve
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint_dir: str = "checkpoints"
    limit_concurrency: int = 64   # requests in flight; more get 503 + Retry-After
