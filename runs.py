"""Where a training run lives, so that nothing a user trained is ever lost: every --train writes its own folder
runs/<task>/<run-name>/ (resolved config, metrics.jsonl, plots, model.pt and model.last.pt, summary.json when
it finished), and checkpoints/<task>.pt is a copy of the latest finished run's best model. What a run would
replace is moved aside instead; and every checkpoint records where it came from (provenance)."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import time

import pandas as pd
import torch

from checkpoint import checkpoint_meta
from errors import DataError
from fsio import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS, CHECKPOINTS = "runs", "checkpoints"
MODEL, SUMMARY, CONFIG = "model.pt", "summary.json", "config.json"


def new_run_dir(task: str, name: str | None) -> str:
    """runs/<task>/<name>, or a timestamp (with -2, -3 ... when that second is taken). A named run that exists
    is refused: it may be a finished model."""
    if name:
        if os.sep in name or name in (".", ".."):
            raise DataError(f"--name {name!r}: a plain folder name, without {os.sep!r}")
        path = os.path.join(RUNS, task, name)
        if os.path.exists(path):
            raise DataError(f"--name {name}: {path} exists; pick another name, or add --resume {name} to go on "
                            "with it")
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(RUNS, task, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(RUNS, task, f"{stamp}-{n}")
    return path


def holds_run(folder: str) -> bool:
    """Whether a folder already holds a training run's files."""
    return any(os.path.exists(os.path.join(folder, f)) for f in ("metrics.jsonl", SUMMARY, MODEL))


def finished(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, SUMMARY))


def resume_dir(task: str, which: str | bool) -> str:
    """The run folder --resume continues: the named one (`--resume NAME` or a path), or the latest unfinished
    run of the task (the newest resume state without a summary)."""
    if isinstance(which, str):
        path = which if os.path.isdir(which) else os.path.join(RUNS, task, which)
        if not os.path.isdir(path):
            raise DataError(f"--resume {which}: no run folder {path}")
        return path
    states = [p for p in glob.glob(os.path.join(RUNS, task, "*", "model.last.pt"))
              if not finished(os.path.dirname(p))]
    if not states:
        raise DataError(f"--resume: no unfinished run in {os.path.join(RUNS, task)}; start one with "
                        f"python main.py --train --task {task}")
    return os.path.dirname(max(states, key=os.path.getmtime))


def keep_aside(path: str) -> str | None:
    """Move an existing file out of the way (to <name>.<its time>.<ext>) instead of overwriting it; returns the
    new name, or None when there was nothing."""
    if not os.path.exists(path):
        return None
    root, ext = os.path.splitext(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    aside, n = f"{root}.{stamp}{ext}", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{root}.{stamp}-{n}{ext}"
    os.replace(path, aside)
    return aside


def publish(best: str, target: str) -> str | None:
    """Copy a finished run's best checkpoint to `target` (checkpoints/<task>.pt). The checkpoint it replaces is
    kept: it stays in its own run folder, or (a checkpoint without one) is moved aside. Returns where the
    replaced one went (None: nothing was replaced, or it is in its run folder)."""
    aside = None
    if os.path.exists(target):
        try:
            # only the small dict is read, not the weights
            run_dir = checkpoint_meta(target).get("run_dir")
        except Exception:  # unreadable: keep it as it is
            run_dir = None
        if not (run_dir and os.path.exists(os.path.join(run_dir, MODEL))):
            aside = keep_aside(target)
    with atomic_write(target) as tmp:
        shutil.copyfile(best, tmp)
    return aside


# -----------------------------------------------------------------------------
# Provenance

def version() -> str:
    """The project's version: `git describe` of this checkout when there is one, else "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=HERE, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def fingerprint(splits: dict, source: str | None) -> dict:
    """What data a run read: each split's size and a hash of its rows, and the --data file's size and hash (a
    corpus read from token shards, too big to hash here, describes itself: its files' names, sizes and times)."""
    if hasattr(splits, "fingerprint"):
        return {**splits.fingerprint(), "source": source or "built-in"}
    out = {"source": source or "built-in"}
    if source and os.path.isfile(source):
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        out.update(bytes=os.path.getsize(source), sha256=digest.hexdigest()[:16])
    for name, split in splits.items():
        out[name] = {"rows": len(split), "sha256": rows_digest(split)[:16]}
    return out


def rows_digest(split, chunk: int = 50_000) -> str:
    """sha256 of a split as CSV (a DataFrame) or as lines, made a chunk of rows at a time: the same digest as of
    the whole text at once, without that text (~2 bytes a character more) in memory."""
    digest = hashlib.sha256()
    for i in range(0, len(split), chunk):
        if isinstance(split, pd.DataFrame):
            part = split.iloc[i:i + chunk].to_csv(index=False, header=i == 0)
        else:
            part = ("\n" if i else "") + "\n".join(map(str, split[i:i + chunk]))
        digest.update(part.encode("utf-8"))
    if isinstance(split, pd.DataFrame) and not len(split):
        digest.update(split.to_csv(index=False).encode("utf-8"))
    return digest.hexdigest()


def provenance(splits: dict, source: str | None, command: str, project_version: str) -> dict:
    """Recorded in every checkpoint: project version, torch version, the command line, the data."""
    return {"version": project_version or "unknown", "torch": str(torch.__version__), "command": command,
            "data": fingerprint(splits, source)}
