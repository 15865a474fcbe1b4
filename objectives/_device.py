"""Device profiles: measurement protocol and energy constants of one target."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["DeviceProfile", "EnergyConstants"]


@dataclasses.dataclass(frozen=True)
class EnergyConstants:
    """Constants of the energy estimate; every value carries its published source.

    Defaults are Horowitz, "Computing's Energy Problem (and what we can do about it)", ISSCC
    2014, 45 nm figures: fp32 MAC = 3.7 pJ mult + 0.9 pJ add; int8 MAC = 0.2 pJ mult + 0.03 pJ
    add; int4 extrapolated from int8 (multiplier energy ~ bits^2, adder ~ bits: 0.05 + 0.015);
    DRAM 64-bit access 1.3-2.6 nJ, low end taken, i.e. 1300/8 pJ per byte. Static power is the
    idle draw of a Raspberry Pi 4 B (540 mA at 5.1 V ~ 2.7 W; Geerling, "Power Consumption
    Benchmarks", pidramble.com). These are estimates, not measurements; a profile calibrated
    with a power meter replaces them.

    Example:
        >>> EnergyConstants().mac_pj(8)
        0.23
    """

    mac_pj_by_bits: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: {32: 4.6, 8: 0.23, 4: 0.065})
    byte_pj: float = 162.5
    static_w: float = 2.7
    source: str = ("Horowitz ISSCC 2014 (45 nm MAC and DRAM energy); static power: Raspberry Pi 4 B "
                   "idle, Geerling pidramble.com")
    measured: bool = False

    def mac_pj(self, bits: int) -> float:
        """Energy of one multiply-accumulate at ``bits`` (weights; 32 means fp32)."""
        return self.mac_pj_by_bits[bits]


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """A target device: its name, the runtime's thread count, and its energy constants.

    ``local`` measures latency on this machine with ONNX Runtime (hardware in the loop).

    Example:
        >>> p = DeviceProfile.local(threads=1)
        >>> p.name, p.threads, p.energy.measured
        ('local', 1, False)
    """

    name: str
    threads: int = 1
    energy: EnergyConstants = dataclasses.field(default_factory=EnergyConstants)

    @classmethod
    def local(cls, threads: int = 1) -> DeviceProfile:
        """This machine, measured directly; energy from the documented default constants."""
        return cls(name="local", threads=threads)
