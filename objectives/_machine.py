"""One timing at a time on a machine, however many workers share it.

Workers of one study on one machine (``edgeslim search --jobs N``, or ``edgeslim worker`` started
by hand beside a search) fine-tune in parallel, but a latency measurement must see the machine as
the device profile describes it: the profile's thread count and nothing else computing. Two file
locks (``flock``) in the temp folder coordinate every edgeslim process of this user:

- *work*: a fine-tune or evaluation step holds it shared; a timing holds it exclusive.
- *gate*: a timing takes it exclusive before it waits for *work*, and a step passes through it
  (shared, released at once) before it takes *work*. A waiting timing therefore stops new steps
  from starting while the steps under way finish, so timings are never starved by a stream of
  steps (a turnstile).

A single process pays two uncontended ``flock`` calls per step (microseconds). The locks are
released by the kernel when a process dies, so a killed worker never blocks the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["compute_slot", "lock_dir", "timing_slot"]

_fds: dict[str, int] = {}
_depth = {"compute": 0, "timing": 0}


def lock_dir() -> Path:
    """Folder of the machine-wide lock files: ``EDGESLIM_LOCK_DIR``, else the temp folder.

    Example:
        >>> lock_dir().is_dir()
        True
    """
    return Path(os.environ.get("EDGESLIM_LOCK_DIR") or tempfile.gettempdir())


def _fd(name: str) -> int:
    key = f"{lock_dir()}/{name}"
    if key not in _fds:
        _fds[key] = os.open(lock_dir() / f"edgeslim-{os.getuid()}-{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    return _fds[key]


@contextlib.contextmanager
def timing_slot() -> Iterator[None]:
    """Hold the machine for a latency measurement: waits for the fine-tune steps of other
    workers to finish and keeps new ones from starting until the timing is done.

    Example:
        >>> with timing_slot():
        ...     pass
    """
    if _depth["timing"] or _depth["compute"]:  # nested in this process: already coordinated
        yield
        return
    gate, work = _fd("gate"), _fd("work")
    fcntl.flock(gate, fcntl.LOCK_EX)
    try:
        fcntl.flock(work, fcntl.LOCK_EX)
        _depth["timing"] += 1
        try:
            yield
        finally:
            _depth["timing"] -= 1
            fcntl.flock(work, fcntl.LOCK_UN)
    finally:
        fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def compute_slot() -> Iterator[None]:
    """Hold a share of the machine for one fine-tune or evaluation step; many workers may hold
    it at once, none while a timing runs.

    Example:
        >>> with compute_slot():
        ...     pass
    """
    if _depth["timing"] or _depth["compute"]:
        yield
        return
    gate, work = _fd("gate"), _fd("work")
    fcntl.flock(gate, fcntl.LOCK_SH)
    fcntl.flock(gate, fcntl.LOCK_UN)
    fcntl.flock(work, fcntl.LOCK_SH)
    _depth["compute"] += 1
    try:
        yield
    finally:
        _depth["compute"] -= 1
        fcntl.flock(work, fcntl.LOCK_UN)
