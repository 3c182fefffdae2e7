# lets tests import the flat top-level modules (main, models, data, ...) from any working directory
import math
import os
import platform
import resource
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


def cpu_quota() -> int | None:
    """The container's CPU limit (cgroup v2 cpu.max, or v1's cfs quota and period), rounded up; None if none."""
    def read(name: str) -> str:
        with open(os.path.join("/sys/fs/cgroup", name)) as f:
            return f.read().strip()
    try:
        quota, period = read("cpu.max").split()
    except OSError:
        try:
            quota, period = read("cpu/cpu.cfs_quota_us"), read("cpu/cpu.cfs_period_us")
        except OSError:
            return None
    return None if quota in ("max", "-1") else max(1, math.ceil(int(quota) / int(period)))


# torch starts one thread per visible core: on a many-core host with a 2-CPU quota that is dozens of threads
# spinning on two CPUs. Every test and the processes it starts get the CPUs this run may use.
VISIBLE = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
CPUS = min(VISIBLE, cpu_quota() or math.inf)
os.environ.setdefault("OMP_NUM_THREADS", str(CPUS))


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    """One line on the machine, shown even under -q: what a CI log needs to explain a slow or failed run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    disk = shutil.disk_usage(ROOT).free / 2 ** 30
    tmp = shutil.disk_usage(tempfile.gettempdir()).free / 2 ** 30
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    import torch
    from optim import newton_schulz_dtype
    from runtime import cpu_name
    reporter.write_line(
        f"machine: {cpu_name()}, Python {platform.python_version()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads (Muon's Newton-Schulz in {newton_schulz_dtype(torch.device('cpu'))}), "
        f"{os.cpu_count()} cores visible, {CPUS} usable "
        f"(OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}), {pages:.0f} GiB RAM, free disk {disk:.0f} GiB "
        f"(repo) / {tmp:.0f} GiB (tmp), open files <= {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, "
        f"processes <= {resource.getrlimit(resource.RLIMIT_NPROC)[0]}")
