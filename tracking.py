"""Optional experiment trackers next to the always-written metrics.jsonl: TensorBoard event files and a local
MLflow store. Both receive the rows the training loop logs, under the same tag names:

    Train/Loss  Train/Avg_Loss  Train/Aux_Balance  Train/Aux_Z  Train/LR  Train/Tokens_per_s
    Experts/layer<l>/expert<e>  (share of the layer's token assignments)
    Val/Loss  Val/Accuracy  Val/F1  (classifier)  and  Val/<metric> for the rest (Val/BPC, Val/Char_Acc, ...)

The packages are optional: a missing one is a one-line error saying what to pip install.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from config import Options
from distributed import is_main_process
from errors import DataError

TRAIN_TAGS = {"train_loss": "Train/Loss", "train_loss_avg": "Train/Avg_Loss", "aux_balance": "Train/Aux_Balance",
              "aux_z": "Train/Aux_Z", "lr": "Train/LR", "tokens_per_s": "Train/Tokens_per_s"}
VAL_TAGS = {"val_loss": "Val/Loss", "val_acc": "Val/Accuracy", "val_f1": "Val/F1"}


def tags(row: dict) -> dict[str, float]:
    """One metrics-log row -> {tag: value} for the trackers (numbers only)."""
    out = {}
    for key, value in row.items():
        if key in TRAIN_TAGS:
            out[TRAIN_TAGS[key]] = value
        elif key in VAL_TAGS:
            out[VAL_TAGS[key]] = value
        elif key.startswith("val_"):
            out["Val/" + key[4:].title()] = value
    for layer, shares in enumerate(row.get("expert_load") or []):
        for expert, share in enumerate(shares):
            out[f"Experts/layer{layer}/expert{expert}"] = share
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DataError("--tensorboard needs the optional package tensorboard: pip install tensorboard") from None
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir)

    def write(self, row: dict) -> None:
        for tag, value in tags(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def finish(self, artifacts: list[str]) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run: the resolved configs as params, every row's tags as metrics, the PNGs as artifacts.

    The store is ./mlruns unless MLFLOW_TRACKING_URI says otherwise (a database or a tracking server). MLflow 3
    keeps that file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which this opts into."""

    def __init__(self, experiment: str, run_name: str, params: dict):
        try:
            import mlflow
        except ImportError:
            raise DataError("--mlflow needs the optional package mlflow: pip install mlflow-skinny") from None
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or
                                "file:" + os.path.abspath("mlruns"))
        mlflow.set_experiment(experiment)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def write(self, row: dict) -> None:
        self.mlflow.log_metrics(tags(row), step=int(row["step"]))

    def finish(self, artifacts: list[str]) -> None:
        for path in artifacts:
            if path and os.path.exists(path):
                self.mlflow.log_artifact(path)
        self.mlflow.end_run()


def sinks(opts: Options, task: str, model_cfg, train_cfg) -> list:
    """The trackers asked for with --tensorboard / --mlflow (trainer.run_log asks on rank 0 only)."""
    out = []
    if opts.tensorboard:
        out.append(TensorBoardSink(os.path.join(opts.out_dir, "tensorboard")))
    if opts.mlflow:
        params = {"task": task, **{f"model.{k}": v for k, v in asdict(model_cfg).items()},
                  **{f"train.{k}": v for k, v in asdict(train_cfg).items()}}
        out.append(MlflowSink(f"moe-{task}", os.path.basename(os.path.normpath(opts.out_dir)), params))
    return out


class MetricsLog:
    """Append-only JSONL log; every row also kept in memory for the plots and passed to the optional trackers
    (`sinks`: TensorBoard, MLflow; see tracking.py). `append` continues a resumed run. No path: memory only."""

    def __init__(self, path: str | None, append: bool = False, sinks: list | None = None):
        self.path, self.rows, self.sinks = path, [], list(sinks or [])
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if append and os.path.exists(path):
                self.rows = self.read(path)
            else:
                open(path, "w").close()

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for sink in self.sinks:
            sink.write(row)

    def close(self, artifacts: list[str | None] = ()) -> None:
        """End the trackers' runs; `artifacts` (the PNGs) go to the ones that store files."""
        for sink in self.sinks:
            sink.finish([a for a in artifacts if a])
        self.sinks = []


def run_log(opts: Options, task: str, model_cfg, train_cfg, append: bool = False) -> MetricsLog:
    """The metrics log of a --train run: <out_dir>/metrics.jsonl plus the trackers of --tensorboard/--mlflow,
    on rank 0 only (other ranks log to memory)."""
    if not is_main_process():
        return MetricsLog(None)
    return MetricsLog(os.path.join(opts.out_dir, "metrics.jsonl"), append,
                      sinks(opts, task, model_cfg, train_cfg))
