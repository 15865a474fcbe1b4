"""Remote kits: micro-models and a runner (numpy + onnxruntime only) to time on a device that cannot
run edgeslim, and fitting what comes back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeslim.objectives.devices import _runner
from edgeslim.objectives.devices._calibrate import (_LONE_KEYS, GROUP, REFERENCE_KERNELS, TRACK_EVERY,
                                                     CalibrationResult, SpeedTrack, _fit, _fit_chains, io_kernels,
                                                     network_record)
from edgeslim.objectives.devices._kernels import Kernel
from edgeslim.objectives.devices._layout import layout_of
from edgeslim.objectives.devices._micro import (CHAINS, KERNEL_TYPES, MODES, chain_model, design, measuring_order,
                                                 micro_model, random_chain)

__all__ = ["fit_energy", "fit_measurements", "reference_entries", "refit", "seal_kit", "start_kit", "write_kit"]

def start_kit(kit_dir: Path) -> None:
    """Make a kit's ``models/`` folder and write the reference kernels' micro-models into it
    (``models/ref_I.onnx``; :func:`reference_entries` times them)."""
    (kit_dir / "models").mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(REFERENCE_KERNELS):
        onnx.save(micro_model(k), str(kit_dir / f"models/ref_{i}.onnx"))


def reference_entries(group: str) -> list[dict[str, Any]]:
    """Kit entries that time the reference kernels once, together as ``group``.

    Example:
        >>> [e["file"] for e in reference_entries("g1")][:2]
        ['models/ref_0.onnx', 'models/ref_1.onnx']
    """
    return [{"file": f"models/ref_{i}.onnx", "reference": i, "group": group} for i in range(len(REFERENCE_KERNELS))]


def seal_kit(kit_dir: Path, identity: Any, fields: Mapping[str, Any]) -> Path:
    """Write ``kit.json`` (kit version, an id hashed from ``identity``, then ``fields``) and copy
    the runner in as ``run_kit.py``; returns ``kit_dir``."""
    kit_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    manifest = {"kit_version": _runner.KIT_VERSION, "kit_id": kit_id, **fields}
    (kit_dir / "kit.json").write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(_runner.__file__, kit_dir / "run_kit.py")
    return kit_dir


def write_kit(kit_dir: Path, threads: int, mode: str = "full", seed: int = 0, focus: Sequence[Kernel] = (),
              focus_info: Mapping[str, Any] | None = None, networks: Sequence[Mapping[str, Any]] = (),
              structures: Sequence[Mapping[str, Any]] = ()) -> Path:
    """A self-contained kit: micro-models, ``kit.json`` and ``run_kit.py`` (numpy + onnxruntime).

    Remote devices cannot refit between rounds, so the kit holds a fixed design the size of the
    mode's whole adaptive budget, plus the ``focus`` kernels, the chains and the focus
    ``networks`` and ``structures`` (random whole networks; each timed together with its
    kernels alone); the reference kernels and the
    Identity (overhead) models are timed at the start, every ``TRACK_EVERY`` models and at the
    end. Entries with the same ``group`` are timed together, interleaved.
    """
    per_type, rounds, n_val, n_nb = MODES[mode]
    kernels = measuring_order(design(KERNEL_TYPES, per_type + rounds * (n_val + n_nb), seed) + list(focus), seed)
    start_kit(kit_dir)
    entries: list[dict[str, Any]] = []
    for i, k in enumerate(io_kernels()):
        onnx.save(micro_model(k), str(kit_dir / f"models/io_{i}.onnx"))
    since = 0
    groups = 0  # entries with one "group" are timed together, interleaved (see _runner.time_group)

    def new_group() -> str:
        nonlocal groups
        groups += 1
        return f"g{groups}"

    def time_reference(force: bool = False) -> bool:
        # the device's speed over the run (see SpeedTrack), timed every TRACK_EVERY models
        nonlocal since
        if force or since >= TRACK_EVERY:
            g = new_group()
            entries.extend(reference_entries(g))
            entries.extend({"file": f"models/io_{i}.onnx", "kernel": dataclasses.asdict(k), "group": g}
                           for i, k in enumerate(io_kernels()))
            since = 0
            return True
        return False

    time_reference(force=True)
    g = new_group()
    for i, k in enumerate(kernels):
        if time_reference() or i % GROUP == 0:
            g = new_group()
        name = f"models/k{i:05d}.onnx"
        onnx.save(micro_model(k, seed=i), str(kit_dir / name))
        entries.append({"file": name, "kernel": dataclasses.asdict(k), "group": g})
        since += 1
    def add_with_parts(stem: str, what: dict[str, Any], ks: Sequence[Kernel], write: Callable[[Path], None]) -> None:
        # a chain or a whole network, then each of its kernels alone: one group, timed together
        nonlocal since
        time_reference()  # never between a model and its parts
        g = new_group()
        name = f"models/{stem}.onnx"
        write(kit_dir / name)
        entries.append({"file": name, **what, "parts": list(range(len(entries) + 1, len(entries) + 1 + len(ks))),
                        "group": g})
        for i, k in enumerate(ks):
            part = f"models/{stem}_{i}.onnx"
            onnx.save(micro_model(k, seed=len(entries)), str(kit_dir / part))
            entries.append({"file": part, "kernel": dataclasses.asdict(k), "group": g})
        since += 1 + len(ks)

    rng = np.random.default_rng(seed + 2)
    for j in range(CHAINS[mode]):
        ks, acts = random_chain(rng)
        add_with_parts(f"c{j:05d}", {"chain": {"kernels": [dataclasses.asdict(k) for k in ks], "acts": acts}}, ks,
                       lambda p, ks=ks, acts=acts: onnx.save(chain_model(ks, acts, seed=len(entries)), str(p)))
    # whole focus candidates, then random structure networks, as they would ship
    wholes = [(f"n{j:03d}", net, {}) for j, net in enumerate(networks)]
    wholes += [(f"s{j:03d}", net, {"structure": True}) for j, net in enumerate(structures)]
    for stem, net, flag in wholes:
        add_with_parts(stem, {"network": network_record(net), **flag},
                       [dataclasses.replace(k, layer="") for k in net["kernels"]],
                       lambda p, net=net: shutil.copyfile(net["path"], p))
    time_reference(force=True)
    return seal_kit(kit_dir, entries, {"mode": mode, "threads": threads, "protocol": _runner.PROTOCOL,
                                       "entries": entries, **({"focus": dict(focus_info)} if focus_info else {})})


def fit_measurements(data: dict[str, Any], device: str) -> CalibrationResult:
    """Fit a model from a kit's ``measurements.json`` content.

    The reference kernels the kit times between its micro-models give the device's speed over
    the run (:class:`SpeedTrack`, recorded in the profile).
    """
    keys = ("p50_ms", "p95_ms", "runs", "rejected", "io_bytes")
    for i, e in enumerate(data["entries"]):
        missing = [k for k in keys if k not in e]
        if missing:
            raise ValueError(f"measurements.entries[{i}] lacks {missing}; re-run the kit's run_kit.py")
    every = [{**e, "seq": i} for i, e in enumerate(data["entries"])]
    track = SpeedTrack.from_entries(every)
    entries = [e for e in every if "kernel" in e]
    kernels = [Kernel(**e["kernel"]) for e in entries]
    meas = [{k: e[k] for k in (*keys, "seq")} for e in entries]
    chains = [{("network" if "network" in e else "chain"): e.get("network", e.get("chain")),
               **{k: e[k] for k in (*keys, "seq")}, **({"structure": True} if e.get("structure") else {}),
               **({"lone": [{k: every[i][k] for k in _LONE_KEYS} for i in e["parts"]]} if "parts" in e else {})}
              for e in every if "chain" in e or "network" in e]
    model = _fit(kernels, meas, device, layout_of(data.get("facts") or {}), select=True)
    _fit_chains(model, chains)
    return CalibrationResult(kernels, meas, model, [], chains, track)


def refit(data: Mapping[str, Any], device: str) -> CalibrationResult:
    """Fit a profile's model anew, with this version's model code, from the measurements and
    chains the profile stores (``edgeslim calibrate --refit``: a newer edgeslim upgrades a
    profile without the device). Each kernel type's form is chosen by cross-validation for
    full-mode and kit profiles, as their first fit chose it.

    Example:
        >>> refit(json.loads(Path("studies/devices/pi5.json").read_text()), "pi5")  # doctest: +SKIP
    """
    entries = data.get("measurements")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the profile stores no measurements to fit; calibrate the device again")
    keys = ("p50_ms", "p95_ms", "io_bytes")
    for i, e in enumerate(entries):
        missing = [k for k in ("kernel", *keys) if k not in e]
        if missing:
            raise ValueError(f"measurements[{i}] lacks {missing}; calibrate the device again")
    kernels = [Kernel(**e["kernel"]) for e in entries]
    meas = [{k: v for k, v in e.items() if k not in ("kernel", "type")} for e in entries]
    model = _fit(kernels, meas, device, layout_of(data.get("facts") or {}),
                 select=data.get("mode") in ("full", "kit"))
    chains = list(data.get("chains") or [])
    _fit_chains(model, chains)
    return CalibrationResult(kernels, meas, model, list(data.get("rounds") or []), chains)


def fit_energy(kernels: Sequence[Kernel], meas: Sequence[dict[str, Any]], source: str) -> Any:
    """Fit energy constants to metered micro-model runs (non-negative least squares).

    Model per inference: Σ_bits e_mac(bits)·MACs + e_byte·bytes moved + P_static·latency.
    Returns ``None`` when the runs carry no energy readings (no meter).
    """
    from scipy.optimize import nnls

    from edgeslim.objectives.devices._profile import EnergyConstants

    rows, target = [], []
    for k, m in zip(kernels, meas):
        if "energy_mj" not in m:
            continue
        moved = k.weight_elems * k.bits / 8 + k.act_bytes * (k.in_elems + k.out_elems)
        cb = k.compute_bits
        rows.append([k.macs * (cb == 32), k.macs * (cb == 8), k.macs * (cb == 4), moved,
                     m["p50_ms"]])
        target.append(m["energy_mj"])
    if len(rows) < 10:
        return None
    a = np.array(rows, dtype=float)
    scale = np.maximum(a.max(axis=0), 1e-12)
    coef, _ = nnls(a / scale, np.array(target))
    coef = coef / scale
    pj = 1e9  # mJ -> pJ
    return EnergyConstants(mac_pj_by_bits={32: coef[0] * pj, 8: coef[1] * pj, 4: coef[2] * pj},
                           byte_pj=coef[3] * pj, static_w=float(coef[4]), source=source, measured=True)
