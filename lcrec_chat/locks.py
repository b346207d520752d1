"""Coordination between processes that share a folder: an exclusive file lock, and whether a process still runs.

Two processes may work on one cache or run folder at once (two `methods` processes sharing CoLLM's scoring, an
`evaluate` waiting for a `baselines` stage, two loads converting the same base model); these are the
primitives they use.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on `path` (created if missing). Not reentrant: a process that holds it and asks
    again waits forever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; callers keep their files whole by atomic renames or retries
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path`'s contents with `text` in one step (a temporary file beside it, then a rename): a reader, or
    a process stopped mid-write, sees the old file or the new one, never a part of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
