"""Device profiles, assembled in one place: from a calibration on this machine, from a kit's
measurements, or refitted from a stored profile; and reading what a device sent back."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeslim.objectives.devices import _calibrate, _kits, _runner
from edgeslim.objectives.devices._kernels import Kernel, kernel_type
from edgeslim.objectives.devices._layout import layout_of, probe_layout
from edgeslim.objectives.devices._profile import (DeviceProfile, EnergyConstants, nchwc_block_of,
                                                  profile_id)
from edgeslim.spaces import ProfileError

__all__ = ["BuiltProfile", "calibrate_profile", "foreign_device", "kit_profile", "read_kit_results",
           "refit_profile", "remeasure_line"]


@dataclasses.dataclass
class BuiltProfile:
    """A profile and the calibration it came from, with the lines that tell the user about it."""

    profile: DeviceProfile
    result: Any  # CalibrationResult

    def summary(self) -> list[str]:
        """What was measured and fitted, the device's speed over the run, the adaptive rounds."""
        r, energy = self.result, self.profile.energy
        lines = [f"{len(r.kernels)} micro-models over {len(r.model.types_)} kernel types and "
                 f"{sum('chain' in c for c in r.chains)} kernel chains, "
                 f"{sum('network' in c for c in r.chains)} whole networks, "
                 f"per-inference overhead {r.model.overhead_[0][1] * 1e3:.1f} us; energy "
                 f"{'fitted to the power meter' if energy.measured else 'uses documented default constants (estimate)'}"]
        lay, costs = r.model.layout, r.model.kernel_costs_ * 1e3
        lines.append(("no blocked layout" if lay.block <= 1 else
                      f"blocked layout: NCHWc block {lay.block}; convs chain in it with input channels a multiple of "
                      f"{lay.conv_multiple}, depthwise with a multiple of {lay.dw_multiple}, max pools of "
                      f"{lay.pool_multiple}") + f" ({lay.source}); in-network cost per kernel "
                     + ", ".join(f"{d} {c:+.1f} us" for d, c in zip(("int8", "blocked", "other", "add"), costs)))
        if r.track is not None and len(r.track.points) >= 3:
            f = [r.track.factor(s) for s, _ in r.track.points]
            lines.append(f"device speed over the calibration: {min(f) - 1:+.1%} to {max(f) - 1:+.1%} around its "
                         f"median ({len(f)} timings of the reference kernels; stretches over "
                         f"{_runner.EXCURSION:.0%} off are measured again, smaller drift is recorded, not corrected for)")
        remeasured = self.profile.extra.get("remeasured")
        if remeasured:
            lines.append(remeasure_line(remeasured))
        for rd in r.rounds:
            lines.append(f"adaptive round {rd['round']}: held-out MAPE {rd['heldout_mape']:.1%}, "
                         f"within 10% {rd['heldout_within_10pct']:.0%} over {rd['points']} new kernels")
        return lines


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _assemble(name: str, threads: int, result: Any, facts: Mapping[str, Any], protocol: Mapping[str, Any],
              energy: EnergyConstants, created: str, mode: str, remeasured: Mapping[str, Any] | None,
              focus: Mapping[str, Any] | None) -> DeviceProfile:
    extra: dict[str, Any] = {
        "created": created, "mode": mode, "protocol": dict(protocol), "rounds": result.rounds,
        "measurements": [{"kernel": dataclasses.asdict(k), "type": kernel_type(k), **m}
                         for k, m in zip(result.kernels, result.measurements)],
        "chains": result.chains,
    }
    if result.track is not None and result.track.points:
        extra["reference"] = {"kernels": [dataclasses.asdict(k) for k in _calibrate.REFERENCE_KERNELS],
                              "p50_ms": result.track.reference()}
        extra["speed_track"] = result.track.to_dict()
    if remeasured:
        extra["remeasured"] = dict(remeasured)
    if focus:
        extra["focus"] = dict(focus)
    return DeviceProfile(name=name, threads=threads, energy=energy, latency_model=result.model, facts=dict(facts),
                         profile_id=profile_id(facts, created), extra=extra)


def calibrate_profile(name: str, threads: int, mode: str = "quick", seed: int = 0, *,
                      focus: Sequence[Kernel] = (), networks: Sequence[Mapping[str, Any]] = (),
                      focus_info: Mapping[str, Any] | None = None, power: Any = None, meter: str = "none",
                      progress: Callable[[int, int], None] = lambda d, t: None,
                      say: Callable[[str], None] = lambda m: None,
                      structures: Sequence[Mapping[str, Any]] = ()) -> BuiltProfile:
    """Calibrate this machine as device ``name`` (see :func:`calibrate`) and assemble its profile;
    with a ``power`` reader (RAPL or a power command, described by ``meter``) the energy
    constants are fitted to its readings.

    Example:
        >>> built = calibrate_profile("bench", threads=1)  # doctest: +SKIP
        >>> built.profile.save(Path("studies/devices/bench.json"))  # doctest: +SKIP
    """
    created = _now()
    # the blocked-layout rules the boundary classes use; its block is what [space] channel_multiple = 0 rounds to
    layout = probe_layout()
    result = _calibrate.calibrate(name, threads, mode, seed, progress, power, focus=focus, networks=networks, say=say,
                                  layout=layout, structures=structures)
    facts = _runner.device_facts(threads)
    facts["nchwc_block"], facts["layout"] = layout.block, layout.to_dict()
    energy = EnergyConstants()
    if power is not None:
        energy = _kits.fit_energy(result.kernels, result.measurements,
                                  f"fitted to {meter} readings during calibration on {created}") or energy
    profile = _assemble(name, threads, result, facts, _runner.PROTOCOL, energy, created, mode, result.remeasured,
                        focus_info)
    return BuiltProfile(profile, result)


def kit_profile(data: Mapping[str, Any], name: str, source: str = "measurements") -> BuiltProfile:
    """The profile of a remote device from what its kit's ``run_kit.py`` measured (``data``, as
    :func:`read_kit_results` returns it); ``source`` names the file in errors."""
    if data.get("purpose") == "check":
        raise ProfileError(f"{source!r} holds a check kit's measurements, not a calibration's; report on them "
                           f"with `edgeslim check-latency --device {data.get('device', 'NAME')} --measured {source}`")
    try:
        result = _kits.fit_measurements(dict(data), name)
        facts, protocol = dict(data["facts"]), data["protocol"]
        threads = int(facts.get("threads", 1))
        _record_layout(facts)  # what the model was fitted with
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ProfileError(f"{source!r} is malformed ({type(e).__name__}: {e}); nothing was written; "
                           "run run_kit.py on the device again") from None
    profile = _assemble(name, threads, result, facts, protocol, EnergyConstants(), _now(), data.get("mode", "kit"),
                        data.get("remeasured"), data.get("focus"))
    return BuiltProfile(profile, result)


def _record_layout(facts: dict[str, Any]) -> None:
    """Write into ``facts`` the layout rules a fit without probing used (see ``layout_of``)."""
    layout = layout_of(facts)
    facts["nchwc_block"], facts["nchwc_block_source"] = nchwc_block_of(facts)
    facts["layout"] = layout.to_dict()


def refit_profile(path: Path, name: str) -> BuiltProfile:
    """The stored profile at ``path`` with its model fitted again, by this version, from the
    measurements and chains it keeps (nothing is measured)."""
    data = DeviceProfile.read_document(path)
    if not isinstance(data, dict):
        raise ProfileError(f"device profile {str(path)!r} is not a profile document; calibrate it again")
    try:
        result = _kits.refit(data, name)
    except (ValueError, TypeError, KeyError) as e:
        raise ProfileError(f"device profile {str(path)!r}: {e}") from None
    # the rest of the document (facts, energy, measurements, id) is validated as any profile is
    facts = dict(data.get("facts") or {})
    _record_layout(facts)  # what the refit used
    profile = DeviceProfile.from_dict({**data, "facts": facts, "model": result.model.to_dict(),
                                       "refit": {"at": _now(), "from_model_of": data.get("created")}},
                                      where=f"device profile {str(path)!r}")
    return BuiltProfile(profile, result)


def read_kit_results(name: str, runner: str, new_kit: str) -> dict[str, Any]:
    """The measurements a kit's ``runner`` wrote on the device, refused in one line when the file
    is missing, is not JSON, or comes from another kit version (``new_kit``: the command that
    writes a new kit).

    Example:
        >>> read_kit_results("no-such.json", "run_kit.py", "edgeslim calibrate --kit")
        Traceback (most recent call last):
        ...
        edgeslim.spaces._errors.ProfileError: measurements file 'no-such.json' does not exist; run run_kit.py on the device first
    """
    path = Path(name)
    if not path.is_file():
        raise ProfileError(f"measurements file {name!r} does not exist; run {runner} on the device first")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ProfileError(f"measurements file {name!r} is not valid JSON ({e}); copy it from the device again "
                           f"or run {runner} there again") from None
    if not isinstance(data, dict):
        raise ProfileError(f"measurements file {name!r} holds a {type(data).__name__}, not {runner}'s results; "
                           f"run {runner} on the device again")
    if data.get("kit_version") != _runner.KIT_VERSION:
        raise ProfileError(f"{name!r} comes from kit version {data.get('kit_version')!r}, this edgeslim "
                           f"reads version {_runner.KIT_VERSION}; write a new kit with `{new_kit}`")
    return data


def foreign_device(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    """How this machine differs from the one a profile was calibrated on ('' when it does not,
    or when the profile records no facts).

    Example:
        >>> foreign_device({"cpu_model": "Cortex-A76", "cores": 4}, {"cpu_model": "AMD EPYC", "cores": 2})
        'CPU Cortex-A76 there, AMD EPYC here; 4 cores there, 2 here'
    """
    diffs = []
    if theirs.get("cpu_model") and theirs.get("cpu_model") != ours.get("cpu_model"):
        diffs.append(f"CPU {theirs['cpu_model']} there, {ours.get('cpu_model')} here")
    if theirs.get("cores") and theirs.get("cores") != ours.get("cores"):
        diffs.append(f"{theirs['cores']} cores there, {ours.get('cores')} here")
    if "isa_flags" in theirs and sorted(theirs["isa_flags"]) != sorted(ours.get("isa_flags", [])):
        diffs.append(f"ISA {','.join(sorted(theirs['isa_flags'])) or 'none'} there, "
                     f"{','.join(sorted(ours.get('isa_flags', []))) or 'none'} here")
    return "; ".join(diffs)


def remeasure_line(r: Mapping[str, Any]) -> str:
    """What a calibration did about measurements taken while the device ran off its usual speed.

    Example:
        >>> remeasure_line({"measurements": 40, "worst_factor": 1.6, "back": True, "waited_s": 15.0, "replaced": 38})
        'measured 40 micro-models again (timed while the device ran up to +60% off its usual speed; it was back after waiting 15 s): 38 new results kept'
    """
    what = (f"{r['measurements']} micro-models timed while the device ran up to {r['worst_factor'] - 1:+.0%} off "
            f"its usual speed")
    if not r.get("back"):
        return (f"kept {what}: it did not come back within {r['waited_s']:.0f} s of waiting (last seen "
                f"{r['factor_then'] - 1:+.0%}); calibrate again when the device is quiet")
    return (f"measured {r['measurements']} micro-models again (timed while the device ran up to "
            f"{r['worst_factor'] - 1:+.0%} off its usual speed; it was back after waiting {r['waited_s']:.0f} s): "
            f"{r['replaced']} new results kept")
