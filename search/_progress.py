"""A dependency-free progress line with ETA for trials, training and calibration."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``'1m15s'``.

    Example:
        >>> format_duration(75), format_duration(3725)
        ('1m15s', '1h02m')
    """
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """``[#####-----] 5/10 trials  elapsed 12s  ETA 12s  front 3``, redrawn in place on a TTY.

    Not on a TTY (CI logs, files), each update is one line.

    Example:
        >>> import io
        >>> p = Progress(2, "trials", stream=io.StringIO())
        >>> p.update(1, "front 1")
        >>> "1/2 trials" in p.stream.getvalue()
        True
    """

    def __init__(self, total: int, unit: str, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = max(total, 1)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, note: str = "") -> None:
        """Redraw with ``done`` units finished and a free-text note."""
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        eta_s = format_duration(eta) if done else "?"
        line = (f"[{bar}] {done}/{self.total} {self.unit}  elapsed {format_duration(elapsed)}  "
                f"ETA {eta_s}  {note}")
        if self._tty:
            self.stream.write("\r\x1b[2K" + line)
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
