"""Power meters for energy calibration: Linux RAPL powercap counters, or a command printing watts."""

from __future__ import annotations

import shlex
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["PowerCommandReader", "RaplReader", "find_rapl"]


class RaplReader:
    """Cumulative energy in joules from one RAPL powercap zone, handling counter wrap-around.

    The counter (``energy_uj``) wraps at ``max_energy_range_uj``; each read adds the delta
    since the previous read, so call it at least once per wrap period (minutes at most).

    Example:
        >>> reader = RaplReader(Path("/sys/class/powercap/intel-rapl:0"))  # doctest: +SKIP
        >>> e0 = reader(); ...; joules = reader() - e0  # doctest: +SKIP
    """

    def __init__(self, zone: Path) -> None:
        self.zone = zone
        self.max_uj = int((zone / "max_energy_range_uj").read_text())
        self._last = self._raw()
        self._total_uj = 0

    def _raw(self) -> int:
        return int((self.zone / "energy_uj").read_text())

    def __call__(self) -> float:
        now = self._raw()
        delta = now - self._last
        if delta < 0:  # the counter wrapped
            delta += self.max_uj + 1
        self._total_uj += delta
        self._last = now
        return self._total_uj / 1e6


def find_rapl(root: Path = Path("/sys/class/powercap")) -> RaplReader | None:
    """The package-level RAPL zone (``intel-rapl:0`` or AMD's equivalent), or None.

    Example:
        >>> find_rapl(Path("/nonexistent")) is None
        True
    """
    if not root.is_dir():
        return None
    for zone in sorted(root.glob("*rapl:*")):
        if zone.name.count(":") == 1 and (zone / "energy_uj").is_file():
            try:
                return RaplReader(zone)
            except (OSError, ValueError):
                return None
    return None


class PowerCommandReader:
    """Cumulative energy in joules from a command that prints instantaneous watts, one per line.

    For USB power meters, INA219 boards or ``tegrastats`` wrappers: the command runs in the
    background and each reading is integrated over the time since the previous one.

    Example:
        >>> r = PowerCommandReader("sh -c 'while true; do echo 2.0; sleep 0.01; done'")  # doctest: +SKIP
    """

    def __init__(self, command: str) -> None:
        self._proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE, text=True)
        self._joules = 0.0
        self._last_t = time.monotonic()
        self._last_w: float | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                watts = float(line.strip().split()[0])
            except (ValueError, IndexError):
                continue
            with self._lock:
                now = time.monotonic()
                if self._last_w is not None:
                    self._joules += self._last_w * (now - self._last_t)
                self._last_t, self._last_w = now, watts

    def __call__(self) -> float:
        with self._lock:
            extra = (self._last_w or 0.0) * (time.monotonic() - self._last_t)
            return self._joules + extra

    def close(self) -> None:
        """Stop the meter command."""
        self._proc.terminate()
