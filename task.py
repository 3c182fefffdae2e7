"""What a task is: everything that differs between the classifier, the language model and the seq2seq model,
behind one interface. The pipeline trains any task through it, and every way of using a trained model (the CLI's
modes, --analyze, --export onnx, the server) asks the task instead of switching on its name.

Adding a task = one module with a Task subclass + one line in registry.py. Its parts:

    training    splits, new_tokenizer, sized, data (-> a TaskData), phases/phase (before the main one),
                baselines
    using       load(checkpoint) and the modes it lists in `modes` (infer, classify, generate, eval)
    analysis    analysis_texts, analysis_batches (what --analyze routes through the model)
    export      export_inputs (the model's inputs for ONNX; tasks that do not export refuse there)
    serving     route and answer (one JSON endpoint), serve_status (what /api/models says about it)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import torch.nn as nn

from config import ModelConfig, Options, TrainConfig
from errors import DataError
from tracking import MetricsLog
from trainer import FitResult


@dataclass
class Phase:
    """A training phase before the main one: what the Trainer runs, and `finish`, which is called with its
    result and returns what the run's summary reports about it."""
    model: nn.Module            # what is trained (the classifier's MaskedLM wraps the classifier's encoder)
    cfg: TrainConfig
    steps_per_epoch: int
    batches: Iterator[dict]
    evaluate: Callable[[], dict]
    select: str
    log: MetricsLog
    finish: Callable[[FitResult], dict]


class TaskData:
    """The splits of one run as the model reads them (built by Task.data)."""

    def describe(self) -> str:
        """The sizes, for the "model: ..." line."""
        raise NotImplementedError

    def extra(self) -> dict:
        """What the checkpoint keeps besides the weights (label names, the source kind)."""
        return {}

    def sized(self, model_cfg: ModelConfig) -> ModelConfig:
        """The model config with what the data decides (the classifier's TF-IDF vocabulary size)."""
        return model_cfg

    def init_model(self, model: nn.Module) -> None:
        """Start a fresh model's weights from the data where the task does (the classifier's wide part: the
        linear model fitted on the training split); resumed and upcycled models keep their saved weights."""

    def steps_per_epoch(self, cfg: TrainConfig) -> int:
        raise NotImplementedError

    def batches(self, cfg: TrainConfig, device) -> Iterator[dict]:
        """The endless training stream, seeded by cfg.seed."""
        raise NotImplementedError

    def evaluate(self, model, split: str, cfg: TrainConfig, device) -> dict:
        """{"val_...": ...} on `split` ("_"-keys stay out of the summary)."""
        raise NotImplementedError

    def calibrate(self, model, test: dict, cfg: TrainConfig, device) -> tuple[dict, dict]:
        """After the test split is scored with the best checkpoint: (what the checkpoint keeps, test metrics)."""
        return {}, {}

    def report(self, model, rows: list[dict], test: dict, out_dir: str) -> dict:
        """Plots and prediction files -> {"loss_curve": png, ...}."""
        raise NotImplementedError


class Task:
    name: str = ""
    train_hint: str = ""          # the command that trains it (for "no checkpoint" errors)
    select: str = "-val_loss"     # the validation metric that picks the checkpoint ("-": lower is better)
    metrics: tuple = ()           # the val_/test_ metrics of the JSON summary and the --compare table
    modes: tuple = ()             # the CLI modes that use a trained model of this task
    route: str = ""               # the server's POST endpoint
    request_fields: dict = {}     # its JSON fields and their JSON types (the server refuses any other field)

    # ---- training
    def splits(self, opts: Options, train_cfg: TrainConfig) -> dict:
        raise NotImplementedError

    def new_tokenizer(self, opts: Options, train_cfg: TrainConfig, model_cfg: ModelConfig, splits: dict):
        raise NotImplementedError

    def sized(self, model_cfg: ModelConfig, tokenizer, splits: dict) -> ModelConfig:
        """The model config sized to the tokenizer (and the classes)."""
        raise NotImplementedError

    def data(self, tokenizer, splits: dict, model_cfg: ModelConfig, opts: Options, start=None) -> TaskData:
        raise NotImplementedError

    def phases(self, train_cfg: TrainConfig) -> list[str]:
        """The names of the training phases before the main one (the classifier's "pretrain": masked-LM)."""
        return []

    def phase(self, name: str, model, data: TaskData, train_cfg: TrainConfig, opts: Options, device,
              resume: bool) -> Phase:
        """Build phase `name` when the pipeline reaches it (`resume`: it goes on from a saved state)."""
        raise NotImplementedError

    def baselines(self, opts: Options, train_cfg: TrainConfig) -> dict:
        """{name: results} added to the --compare table."""
        return {}

    # ---- using a trained model
    def run_mode(self, mode: str, opts: Options, device) -> dict:
        """One of `modes` -> its result (printed by main.py)."""
        if mode not in self.modes:
            raise DataError(f"--{mode} is not a mode of --task {self.name} (it has: "
                            f"{', '.join('--' + m for m in self.modes)})")
        return getattr(self, mode)(opts, device)

    def show(self, mode: str, result: dict, opts: Options) -> None:
        """Print a mode's result for a person (default: the JSON line)."""
        print(json.dumps(result, ensure_ascii=False))

    # ---- --analyze
    def analysis_texts(self, opts: Options, model, tokenizer, device) -> list:
        raise NotImplementedError

    def analysis_batches(self, model, tokenizer, texts: list, device, batch_size: int = 64):
        """(model inputs, {stack name prefix: its token ids (B, T)}) for each batch of `texts`."""
        raise NotImplementedError

    # ---- --export onnx
    def export_inputs(self, ids, config: ModelConfig | None = None) -> tuple[tuple, list[str]]:
        """Token ids (B, T) (and the model's config) -> (the model's inputs for them, the names of its forward's
        arguments they go to); each has a batch axis and a second one: seq, or "features" for a "wide_" input."""
        raise DataError(f"--export onnx: --task {self.name} does not export")

    # ---- --serve
    def serve_load(self, path: str, device):
        raise NotImplementedError

    def serve_status(self, loaded) -> dict:
        return {}

    def serve_model(self, loaded):
        """(model, tokenizer) of what serve_load returned, for the routing view."""
        model, tokenizer, _ = loaded
        return model, tokenizer

    def routing_input(self, text: str) -> list:
        """One text as analysis_batches takes it (seq2seq: a source without a target)."""
        return [text]

    def answer(self, loaded, req: dict, device) -> dict:
        """One POST body -> its JSON answer (api.field checks each value; ApiError for a bad one). A task whose
        answer grows piece by piece also has stream(loaded, req, device), yielding events (the server sends them
        as server-sent events when the body has "stream": true)."""
        raise NotImplementedError
