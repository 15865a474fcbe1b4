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
_held = [0]  # slots this process holds: a nested one is already coordinated


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
def _slot(exclusive: bool) -> Iterator[None]:
    if _held[0]:
        yield
        return
    gate, work = _fd("gate"), _fd("work")
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fcntl.flock(gate, mode)
    try:
        if not exclusive:  # a step only passes the gate: it waits there while a timing holds it
            fcntl.flock(gate, fcntl.LOCK_UN)
        fcntl.flock(work, mode)
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
            fcntl.flock(work, fcntl.LOCK_UN)
    finally:
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)


def timing_slot() -> contextlib.AbstractContextManager[None]:
    """Hold the machine for a latency measurement: waits for the fine-tune steps of other
    workers to finish and keeps new ones from starting until the timing is done.

    Example:
        >>> with timing_slot():
        ...     pass
    """
    return _slot(exclusive=True)


def compute_slot() -> contextlib.AbstractContextManager[None]:
    """Hold a share of the machine for one fine-tune or evaluation step; many workers may hold
    it at once, none while a timing runs.

    Example:
        >>> with compute_slot():
        ...     pass
    """
    return _slot(exclusive=False)
