"""Device profiles: who the target is, how it was measured, its latency model and energy constants.

Profiles live as schema-versioned JSON in ``studies/devices/NAME.json``. ``local`` is built in:
it has no latency model and means "measure on this machine".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeslim.spaces import ProfileError

if TYPE_CHECKING:
    from edgeslim.objectives.devices._model import LatencyModel

__all__ = ["DEVICES_DIR", "DeviceProfile", "EnergyConstants", "ProfileError", "known_devices", "load_device",
           "nchwc_block_of", "probe_nchwc_block"]

PROFILE_SCHEMA = "edgeslim.device-profile"
PROFILE_VERSION = 1
DEVICES_DIR = Path("studies") / "devices"


@dataclasses.dataclass(frozen=True)
class EnergyConstants:
    """Constants of the energy estimate; every value carries its published source.

    Defaults are Horowitz, "Computing's Energy Problem (and what we can do about it)", ISSCC
    2014, 45 nm figures: fp32 MAC = 3.7 pJ mult + 0.9 pJ add; int8 MAC = 0.2 pJ mult + 0.03 pJ
    add; int4 extrapolated from int8 (multiplier energy ~ bits^2, adder ~ bits: 0.05 + 0.015);
    DRAM 64-bit access 1.3-2.6 nJ, low end taken, i.e. 1300/8 pJ per byte. Static power is the
    idle draw of a Raspberry Pi 4 B (540 mA at 5.1 V ~ 2.7 W; Geerling, "Power Consumption
    Benchmarks", pidramble.com). These are estimates, not measurements; a profile calibrated
    with a power meter replaces them with fitted values (``measured=True``).

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

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"mac_pj_by_bits": {str(k): v for k, v in self.mac_pj_by_bits.items()},
                "byte_pj": self.byte_pj, "static_w": self.static_w, "source": self.source,
                "measured": self.measured}


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """A target device: name, runtime threads, energy constants and (if calibrated) a latency model.

    ``local`` has no latency model: latency is measured on this machine (hardware in the loop).

    Example:
        >>> p = DeviceProfile.local(threads=1)
        >>> p.name, p.threads, p.energy.measured, p.predicts_latency
        ('local', 1, False, False)
    """

    name: str
    threads: int = 1
    energy: EnergyConstants = dataclasses.field(default_factory=EnergyConstants)
    latency_model: LatencyModel | None = dataclasses.field(default=None, compare=False, repr=False)
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    profile_id: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def local(cls, threads: int = 1) -> DeviceProfile:
        """This machine, measured directly; energy from the documented default constants."""
        return cls(name="local", threads=threads)

    @property
    def int8_reduce_range(self) -> bool:
        """Whether int8 weights must use 7-bit levels here: x86 without VNNI saturates otherwise.

        ONNX Runtime's x86 int8 kernels multiply with ``vpmaddubsw`` unless the CPU has VNNI;
        its 16-bit intermediate sums overflow with full-range weights, so outputs go wrong.
        """
        facts = self.facts
        if not facts:
            from edgeslim.objectives.devices._runner import device_facts

            facts = device_facts(self.threads)
        x86 = str(facts.get("machine", "")).lower() in ("x86_64", "amd64", "i686", "x86")
        flags = set(facts.get("isa_flags", []))
        vnni = {"avx512_vnni", "avx_vnni", "amx_int8"} & flags
        if x86 and not vnni and "avx2" not in flags and ("x86", self.name) not in _WARNED:
            _WARNED.add(("x86", self.name))
            warnings.warn(f"device {self.name!r} ({facts.get('cpu_model', 'unknown CPU')}) has neither AVX2 nor "
                          "VNNI: ONNX Runtime's int8 kernels there are not emulated; fine-tuning assumes the AVX2 "
                          "kernels (7-bit weights). Score with `--score artifact` to measure the real artifact",
                          stacklevel=2)
        return x86 and not vnni

    @property
    def channel_multiple(self) -> int:
        """Channel count that ONNX Runtime's blocked (NCHWc) float convs run best at here: the
        block size probed on the device (:func:`probe_nchwc_block`), 1 where it is unknown (a
        profile calibrated before the probe existed, or from a remote kit).

        Pruning to a multiple of it pays: a pruned count between two multiples is padded back
        to the next block at run time, so it costs as much as the unpruned layer.
        """
        if "nchwc_block" in self.facts:
            return int(self.facts["nchwc_block"])
        return probe_nchwc_block() if self.name == "local" else 1

    @property
    def predicts_latency(self) -> bool:
        """True for calibrated profiles (latency predicted by the model, not measured)."""
        return self.latency_model is not None

    def describe(self) -> str:
        """One line for reports: name, id, how latency and energy are obtained."""
        lat = (f"predicted for {self.name} by its calibrated profile ({self.profile_id})" if self.predicts_latency
               else "measured locally")
        en = "fitted to a power meter" if self.energy.measured else "estimated from published constants"
        return f"device {self.name}, {self.threads} thread(s): latency {lat}; energy {en}"

    def to_dict(self) -> dict[str, Any]:
        """The schema-versioned JSON document."""
        if self.latency_model is None:
            raise ProfileError(f"profile {self.name!r} has no latency model to save")
        return {"schema": PROFILE_SCHEMA, "version": PROFILE_VERSION, "name": self.name, "id": self.profile_id,
                "threads": self.threads, "facts": dict(self.facts), "energy": self.energy.to_dict(),
                "model": self.latency_model.to_dict(), **dict(self.extra)}

    def save(self, path: Path, replace: bool = False) -> Path:
        """Write the profile; an existing file is never overwritten unless ``replace`` (then kept as .bak)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not replace:
                raise ProfileError(f"device profile {str(path)!r} already exists; pick another --device name "
                                   "or pass --replace (the old profile is kept as a .bak file)")
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path.rename(path.with_name(f"{path.stem}.{stamp}.bak.json"))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: Any, where: str = "profile") -> DeviceProfile:
        """Validate and load a profile document; errors name the bad field."""
        from edgeslim.objectives.devices._model import LatencyModel

        def need(obj: Any, key: str, typ: type | tuple[type, ...], path: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise ProfileError(f"{where}: field {path} is missing; re-run `edgeslim calibrate`")
            value = obj[key]
            if not isinstance(value, typ) or isinstance(value, bool) and typ in (int, float, (int, float)):
                raise ProfileError(f"{where}: field {path} must be {getattr(typ, '__name__', typ)}, "
                                   f"got {type(value).__name__}")
            return value

        if need(d, "schema", str, "schema") != PROFILE_SCHEMA:
            raise ProfileError(f"{where}: field schema must be {PROFILE_SCHEMA!r}, got {d['schema']!r}")
        version = need(d, "version", int, "version")
        if version != PROFILE_VERSION:
            raise ProfileError(f"{where}: field version is {version}, this edgeslim reads {PROFILE_VERSION}; "
                               "re-run `edgeslim calibrate`")
        name = need(d, "name", str, "name")
        threads = need(d, "threads", int, "threads")
        facts = need(d, "facts", dict, "facts")
        energy_d = need(d, "energy", dict, "energy")
        model_d = need(d, "model", dict, "model")
        for key in ("features", "types"):
            need(model_d, key, (list, dict), f"model.{key}")
        if "kernel_costs" not in model_d or "layout" not in model_d:
            # fitted before the NCHWc block was probed and in-network kernel costs were fitted:
            # its stored measurements refit it with this version's model, without the device
            raise ProfileError(f"{where} was calibrated by an older edgeslim (no probed blocked-layout rules or "
                               f"in-network kernel costs); run `edgeslim calibrate --refit --device {name}` to refit it from "
                               "its stored measurements, or calibrate the device again")
        need(model_d, "overhead_ms", list, "model.overhead_ms")
        need(model_d, "overhead_p95_ratio", (int, float), "model.overhead_p95_ratio")
        for t, v in model_d["types"].items():
            for key in ("coef", "mean", "scale", "intercept", "p95_ratio", "n"):
                need(v, key, (list, int, float), f"model.types.{t}.{key}")
            if not (len(v["coef"]) == len(v["mean"]) == len(v["scale"]) == len(model_d["features"])):
                raise ProfileError(f"{where}: field model.types.{t}.coef has {len(v['coef'])} values, "
                                   f"expected {len(model_d['features'])}")
        mac = need(energy_d, "mac_pj_by_bits", dict, "energy.mac_pj_by_bits")
        try:
            energy = EnergyConstants(
                mac_pj_by_bits={int(k): float(v) for k, v in mac.items()},
                byte_pj=float(need(energy_d, "byte_pj", (int, float), "energy.byte_pj")),
                static_w=float(need(energy_d, "static_w", (int, float), "energy.static_w")),
                source=str(need(energy_d, "source", str, "energy.source")),
                measured=bool(need(energy_d, "measured", bool, "energy.measured")))
            model = LatencyModel.from_dict(model_d, device=name)
        except (ValueError, TypeError, KeyError) as e:
            raise ProfileError(f"{where}: invalid model or energy section ({e}); re-run `edgeslim calibrate`") from None
        extra = {k: v for k, v in d.items() if k not in
                 ("schema", "version", "name", "id", "threads", "facts", "energy", "model")}
        return cls(name=name, threads=threads, energy=energy, latency_model=model, facts=facts,
                   profile_id=str(d.get("id", "")), extra=extra)

    @staticmethod
    def read_document(path: Path) -> Any:
        """A profile file's parsed JSON, unvalidated (``--refit`` reads one whose model this
        version may not load)."""
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"device profile {str(path)!r} is not valid JSON ({e}); re-run `edgeslim calibrate`") from None

    @classmethod
    def load(cls, path: Path) -> DeviceProfile:
        """Read a profile file; warns when it was made with another onnxruntime version."""
        profile = cls.from_dict(cls.read_document(path), where=f"device profile {str(path)!r}")
        import onnxruntime

        theirs = profile.facts.get("onnxruntime")
        if theirs and theirs != onnxruntime.__version__:
            warnings.warn(f"device profile {profile.name!r} was calibrated with onnxruntime {theirs}, this machine "
                          f"has {onnxruntime.__version__}; predictions may be off until you re-calibrate",
                          stacklevel=2)
        return profile


def profile_id(facts: Mapping[str, Any], created: str) -> str:
    """Short id of a calibration: hash of the device facts and the creation time."""
    return hashlib.sha256(json.dumps({"facts": facts, "created": created}, sort_keys=True).encode()).hexdigest()[:12]


def known_devices(devices_dir: Path = DEVICES_DIR) -> list[str]:
    """Names of the calibrated profiles in ``devices_dir`` (plus ``local``)."""
    names = sorted(p.stem for p in devices_dir.glob("*.json") if ".bak" not in p.name) if devices_dir.is_dir() else []
    return ["local", *names]


def load_device(name: str, threads: int | None = None, devices_dir: Path = DEVICES_DIR) -> DeviceProfile:
    """The profile called ``name``: ``local`` or ``devices_dir/NAME.json``.

    Example:
        >>> load_device("local").name
        'local'
    """
    cores = os.cpu_count() or 1
    if name == "local":
        t = threads or 1
        if t > cores:
            raise ProfileError(f"--threads {t} exceeds this machine's {cores} cores; use at most {cores}")
        return DeviceProfile.local(threads=t)
    path = devices_dir / f"{name}.json"
    if not path.is_file():
        raise ProfileError(f"unknown device {name!r}; known devices: {known_devices(devices_dir)}; "
                           f"run `edgeslim calibrate --device {name}` on it first")
    profile = DeviceProfile.load(path)
    if threads and threads != profile.threads:
        raise ProfileError(f"device {name!r} was calibrated with {profile.threads} thread(s), not {threads}; "
                           f"calibrate it again with --threads {threads} under another name")
    return profile


_NCHWC_BLOCK: list[int] = []  # probed once per process


def nchwc_block_of(facts: Mapping[str, Any]) -> tuple[int, str]:
    """The NCHWc channel block a device's ``facts`` record, and where it came from: ``probed``
    (calibrated here, :func:`probe_nchwc_block`), else read off the ISA flags the device
    reported (a kit's device, or a profile calibrated before the probe existed) by ONNX Runtime's
    MLAS rule (16 with AVX-512 F, 8 with AVX2, 1 where it does not block).

    Example:
        >>> nchwc_block_of({"nchwc_block": 16}), nchwc_block_of({"isa_flags": ["avx2", "fma"]})
        ((16, 'probed'), (8, 'from the ISA flags (not probed)'))
    """
    if "nchwc_block" in facts:
        return int(facts["nchwc_block"]), str(facts.get("nchwc_block_source", "probed"))
    flags = {str(f).lower() for f in facts.get("isa_flags") or []}
    return (16 if "avx512f" in flags else 8 if "avx2" in flags else 1), "from the ISA flags (not probed)"
_WARNED: set[tuple[str, str]] = set()


def probe_nchwc_block() -> int:
    """The channel block ONNX Runtime's CPU provider uses for blocked float convs here (8 with
    AVX2, 16 with AVX-512; 1 where it does not block). Found, not assumed: a 3-channel conv is
    optimized by ONNX Runtime and its reordered weight shows how far the channels were padded.

    Example:
        >>> probe_nchwc_block() in (1, 4, 8, 16)
        True
    """
    if _NCHWC_BLOCK:
        return _NCHWC_BLOCK[0]
    import tempfile
    from pathlib import Path

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgeslim.objectives.devices._layout import optimized_graph

    w = numpy_helper.from_array(np.ones((3, 8, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])], [w])
    block = 1
    with tempfile.TemporaryDirectory(prefix="edgeslim-probe-") as tmp:
        optimized = optimized_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), Path(tmp))
        inits = {i.name: i for i in optimized.initializer}
        for node in optimized.node:
            if node.op_type == "Conv" and node.domain == "com.microsoft.nchwc" and node.input[1] in inits:
                block = int(inits[node.input[1]].dims[0])
    _NCHWC_BLOCK.append(block)
    return block
