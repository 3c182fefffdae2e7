"""Where and how a model runs: the device, the autocast dtype, torch.compile's default, seeding."""
from __future__ import annotations

import contextlib
import os
import platform
import random
import resource
import sys

import torch

from errors import DataError

# oneDNN, behind some of torch's CPU matmuls, keeps a compiled primitive for each shape it meets, up to 1,024
# by default, megabytes each: the default seq2seq run grew to 5.4 GB resident that way, three quarters of it
# that cache. 8 entries bound it, with speed unchanged within the runs' noise (docs/results.md, memory). oneDNN
# reads the variable at its first primitive, so setting it on import is early enough; a value the user exported
# wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """"auto" -> bf16 on a CUDA device that supports it, else fp32. On CPU bf16 lost at these widths on every
    machine measured: emulated without AVX-512 BF16 (AMD EPYC, AVX2: classifier fine-tuning 1.4 s vs 0.1 s a
    step), fewer pretraining steps on an Intel Xeon with AMX, slower fine-tuning on an AMD EPYC with
    avx512_bf16 (README, Speed)."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def check_training_dtype(dtype: str, device: torch.device) -> None:
    if dtype == "fp16" and device.type != "cuda":
        raise DataError("--dtype fp16 needs a CUDA device (it runs with a GradScaler); use --dtype bf16 on CPU")


def resolve_compile(compile: str, device: torch.device) -> str:
    """"auto" -> "on" on CUDA, "off" elsewhere. Measured with `bench.py --only train --compile_modes default`:
    on an H100 (bf16) the compiled MoE step took 0.66x the eager one for the LM, 0.85x for classifier
    fine-tuning and 1.04-1.05x (a tie, within the noise) for masked-LM pretraining and seq2seq; on the 2-core CPU
    it was slower at every preset (the grouped experts run outside the compiled graph there, and masked batches
    break the graph at each layer). Compiling costs seconds or more up front."""
    if compile != "auto":
        return compile
    return "on" if device.type == "cuda" else "off"


def autocast(device: torch.device, dtype: str):
    dtype = resolve_dtype(dtype, device)
    if dtype in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return contextlib.nullcontext()


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB: Linux's VmHWM, else ru_maxrss (kilobytes on Linux,
    bytes on macOS). Not ru_maxrss on Linux: it keeps the peak of the process that forked this one, so a run
    started by a big parent (a benchmark, a test suite) would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cpu_name() -> str:
    """The CPU as a time measured on it must name it: /proc/cpuinfo's model name and which of the vector and
    bf16 features that move these models' speed it has (the same machine kind has been each of these)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model or platform.processor() or '?'} ({', '.join(have) if have else 'none of avx2/avx512/amx'})"
