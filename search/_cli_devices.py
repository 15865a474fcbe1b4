"""``edgeslim calibrate`` and ``check-latency``: the CLI over ``edgeslim.objectives.devices``. Each
command registers its own arguments; the work (measuring, fitting, assembling profiles) is the
devices package's, this module parses, checks options and prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["cmd_calibrate", "cmd_check_latency", "fresh_dir", "register"]


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a device's latency model: here (--device), as a kit for a remote device (--kit),
    or from a kit's measurements (--fit); --refit fits a stored profile's measurements again."""
    if args.refit:
        return _refit(args)
    with tempfile.TemporaryDirectory(prefix="edgeslim-nets-") as net_dir:  # focus networks' ONNX files
        return _calibrate_with(args, Path(net_dir))


def _refit(args: argparse.Namespace) -> int:
    from edgeslim.objectives.devices import ProfileError, known_devices, refit_profile

    others = [f for f in ("kit", "fit", "for_", "power_cmd", "threads", "full") if getattr(args, f)]
    if others:
        raise ProfileError(f"--refit re-fits a stored profile and measures nothing; drop "
                           f"{', '.join('--' + o.rstrip('_').replace('_', '-') for o in others)}")
    if not args.device:
        raise ProfileError("--refit needs --device NAME, the stored profile to re-fit")
    devices = Path(args.devices_dir)
    target = devices / f"{args.device}.json"
    if not target.is_file():
        raise ProfileError(f"unknown device {args.device!r}; known devices: {known_devices(devices)}")
    built = refit_profile(target, args.device)
    path = built.profile.save(target, replace=True)
    print(f"re-fitted {path} from its {len(built.result.kernels)} stored measurements and "
          f"{len(built.result.chains)} chains/networks with this version's model; the previous file is kept as .bak")
    return 0


def _focus(args: argparse.Namespace, targets: list[str], mode: str, net_dir: Path) -> tuple[list[Any], dict[str, Any], list[Any]]:
    """The kernels and whole networks of the models ``--for`` names (see ``calibrate --for``)."""
    from edgeslim.search._check import FOCUS_PLANS, focus_networks, workload_kernels
    from edgeslim.search._progress import Progress

    fbar = Progress(1, "focus plans")

    def fprogress(done: int, total: int) -> None:
        fbar.total = total
        fbar.update(done)

    budget = FOCUS_PLANS[mode]
    focus, plans = workload_kernels(targets, budget["min"], budget["max"], budget["seconds"], args.seed or 0, fprogress)
    nbar = Progress(1, "focus networks exported")

    def nprogress(done: int, total: int) -> None:
        nbar.total = total
        nbar.update(done)

    networks = focus_networks(targets, budget["networks"], net_dir, args.seed or 0, nprogress)
    print(f"focus: {len(focus)} distinct kernels from " + ", ".join(f"{t} ({n} plans)" for t, n in plans.items())
          + f", and {len(networks)} whole networks", file=sys.stderr)
    return focus, {"plans": plans, "kernels": len(focus), "networks": len(networks)}, networks


def _structures(mode: str, net_dir: Path, seed: int) -> list[Any]:
    """The random whole networks a calibration of ``mode`` measures (exported into ``net_dir``)."""
    from edgeslim.search._progress import Progress
    from edgeslim.search._structures import STRUCTURES, structure_networks

    bar = Progress(STRUCTURES[mode], "structure networks exported")
    return structure_networks(STRUCTURES[mode], net_dir, seed, lambda done, total: bar.update(done))


def _calibrate_with(args: argparse.Namespace, net_dir: Path) -> int:
    import os

    from edgeslim.objectives.devices import (PowerCommandReader, ProfileError, calibrate_profile, find_rapl,
                                             kit_profile, read_kit_results, write_kit)
    from edgeslim.search._progress import Progress

    cores = os.cpu_count() or 1
    threads = args.threads or 1
    if threads > cores:
        raise ProfileError(f"--threads {threads} exceeds this machine's {cores} cores; use at most {cores}")
    mode = "full" if args.full else "quick"
    devices = Path(args.devices_dir)
    targets = [t for t in (args.for_ or "").split(",") if t]
    if args.kit and args.fit:
        raise ProfileError("--kit writes a kit for a device and --fit reads what one measured: give one of them")
    if targets and args.fit:
        raise ProfileError("--for chooses what a calibration measures; with --fit the kit already did "
                           "(pass --for when writing the kit)")
    if args.kit:
        fresh_dir(Path(args.kit), "--kit")
    else:
        if not args.device:
            raise ProfileError("calibrate needs --device NAME (or --kit DIR to calibrate a remote device)")
        if args.device == "local":
            raise ProfileError("'local' is reserved for measuring on this machine; pick another --device name")
        target = devices / f"{args.device}.json"
        if target.exists() and not args.replace:
            raise ProfileError(f"device profile {str(target)!r} already exists; pick another --device name "
                               "or pass --replace (the old profile is kept as a .bak file)")
    if args.fit:
        data = read_kit_results(args.fit, "run_kit.py", "edgeslim calibrate --kit")
        built = kit_profile(data, args.device, args.fit)
    else:
        focus, focus_info, networks = _focus(args, targets, mode, net_dir) if targets else ([], None, [])
        structures = _structures(mode, net_dir, args.seed or 0)
        if args.kit:
            kit = write_kit(Path(args.kit), threads, mode, args.seed or 0, focus, focus_info, networks, structures)
            n = len(list((kit / "models").glob("*.onnx")))
            print(f"wrote kit {kit} ({n} micro-models, {mode} design, {threads} thread(s)). On the device:\n"
                  f"  1. copy {kit} there; it needs Python 3, numpy and onnxruntime only\n"
                  f"  2. python {kit / 'run_kit.py'} {kit} --out measurements.json\n"
                  f"  3. back here: edgeslim calibrate --fit measurements.json --device NAME")
            return 0
        reader = PowerCommandReader(args.power_cmd) if args.power_cmd else find_rapl()
        meter = (f"power command `{args.power_cmd}`" if args.power_cmd else f"RAPL {reader.zone}") if reader \
            else "none"
        print(f"calibrating {args.device!r}: {mode} mode, {threads} thread(s), power meter: {meter}", file=sys.stderr)
        bar = Progress(1, "micro-models")

        def progress(done: int, total: int) -> None:
            bar.total = total
            if done == total or done % 10 == 0:
                bar.update(done)

        try:
            built = calibrate_profile(args.device, threads, mode, args.seed or 0, focus=focus, networks=networks,
                                      focus_info=focus_info, power=reader, meter=meter, progress=progress,
                                      say=lambda text: print(f"\n{text}", file=sys.stderr), structures=structures)
        finally:
            if reader is not None and hasattr(reader, "close"):
                reader.close()
    path = built.profile.save(target, replace=args.replace)
    lines = built.summary()
    print(f"wrote {path}: {lines[0]}")
    for line in lines[1:]:
        print(f"  {line}")
    print(f"check it: edgeslim check-latency --device {args.device}")
    return 0


def fresh_dir(path: Path, flag: str) -> None:
    """Refuse to write a kit into a folder that holds files already (nothing stored is overwritten).

    Example:
        >>> fresh_dir(Path("no-such-folder-here"), "--kit")
    """
    from edgeslim.spaces import SpecError

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SpecError(f"{flag} {str(path)!r} exists and is not an empty folder; name a new folder "
                        "(nothing is overwritten)")


def cmd_check_latency(args: argparse.Namespace) -> int:
    """Compare a profile's predictions with latency measured here on random candidates, or on a
    remote device through a check kit (``--kit`` writes it, ``--measured`` reads its results)."""
    from edgeslim.objectives.devices import REFERENCE_KERNELS, device_facts, foreign_device, load_device, read_kit_results
    from edgeslim.search._check import (VALIDATION_WORKLOADS, check_latency, rows_from_measurements,
                                        write_check_kit)
    from edgeslim.search._progress import Progress
    from edgeslim.spaces import SpecError

    profile = load_device(args.device, None, Path(args.devices_dir))
    if not profile.predicts_latency:
        raise SpecError("check-latency needs a calibrated profile; --device local measures, it does not predict")
    if args.kit and args.measured:
        raise SpecError("--kit writes a check kit and --measured reads its results: give one of them")
    if args.measured:
        fixed = [f for f, v in (("--samples", args.samples), ("--workloads", args.workloads),
                                ("--threads", args.threads), ("--seed", args.seed), ("--repeat", args.repeat is not None)) if v]
        if fixed:
            raise SpecError(f"{', '.join(fixed)}: the check kit fixed these when it was written; "
                            "give them with --kit")
    samples = 6 if args.samples is None else args.samples
    if samples < 1:
        raise SpecError(f"--samples {samples}: give at least 1 plan per workload")
    workloads = args.workloads.split(",") if args.workloads else list(VALIDATION_WORKLOADS)
    unknown = [w for w in workloads if w not in VALIDATION_WORKLOADS]
    if unknown:
        raise SpecError(f"unknown workloads {unknown}; choose from {list(VALIDATION_WORKLOADS)}")
    reference = (profile.extra.get("reference") or {}).get("p50_ms")
    if reference and len(reference) != len(REFERENCE_KERNELS):
        reference = None
    if args.kit:
        kit = Path(args.kit)
        fresh_dir(kit, "--kit")
        if args.threads and args.threads != profile.threads:
            raise SpecError(f"--threads {args.threads}: a check kit measures with the profile's {profile.threads} "
                            f"thread(s); run_kit.py --threads N on the device measures with another count")
        bar = Progress(samples * len(workloads), "candidates exported")
        write_check_kit(profile, kit, samples, args.seed or 0, workloads, args.repeat is not False,
                        lambda d, t: bar.update(d))
        size = sum(f.stat().st_size for f in (kit / "models").glob("*.onnx")) / 2**20
        print(f"wrote check kit {kit} ({samples * len(workloads)} candidates, {size:.0f} MiB) for profile "
              f"{profile.name!r}. On the device it was calibrated on:\n"
              f"  1. copy {kit} there; it needs Python 3, numpy and onnxruntime only\n"
              f"  2. python {kit / 'run_kit.py'} {kit} --out check.json\n"
              f"  3. back here: edgeslim check-latency --device {profile.name} --measured check.json")
        return 0
    if args.measured:
        data = read_kit_results(args.measured, "the check kit's run_kit.py", "edgeslim check-latency --kit")
        rows = rows_from_measurements(profile, data, reference)
        if data.get("device") != profile.name or data.get("profile_id") != profile.profile_id:
            print(f"note: the kit was written for profile {data.get('device')!r} ({data.get('profile_id')}); "
                  f"predicting with {profile.name!r} ({profile.profile_id})", file=sys.stderr)
        facts = data.get("facts") or {}
        other = foreign_device(profile.facts, facts)
        if other:
            print(f"warning: the kit ran on a machine that is not the one {profile.name!r} was calibrated on "
                  f"({other}): the figures compare two devices", file=sys.stderr)
        where = f"measured on {facts.get('cpu_model') or 'the device'} by a check kit"
        threads = int(facts.get("threads") or profile.threads)
        workloads = list(dict.fromkeys(r.workload for r in rows))
    else:
        other = foreign_device(profile.facts, device_facts(args.threads or profile.threads))
        if other:
            print(f"warning: check-latency measures on this machine, and it is not the one {profile.name!r} was "
                  f"calibrated on ({other}): the figures compare two devices; run it on the device itself, "
                  f"or write a check kit for it with --kit", file=sys.stderr)
        bar = Progress(samples * len(workloads), "candidates")
        repeat = args.repeat is not False
        bar.total *= 2 if repeat else 1
        rows = check_latency(profile, samples, args.seed or 0, workloads, lambda d, t: bar.update(d),
                             args.threads, repeat, reference)
        where, threads = "measured here", args.threads or profile.threads
    return _report_check(profile, rows, workloads, where, threads, args.format)


def _report_check(profile: Any, rows: Sequence[Any], workloads: Sequence[str], where: str, threads: int,
                  fmt: str) -> int:
    """Print check-latency's table (or JSON): overall and per workload, drift-scaled, p95, repeats, worst cases."""
    from edgeslim.objectives.devices import speed_ratio
    from edgeslim.search._check import summarize

    summary = summarize(rows)
    # how much slower (>1) the reference kernels ran around each measurement than during
    # calibration, and what the predictions score scaled by it: drift of the device, not error of the model
    speeds = [r.speed for r in rows if r.speed is not None]
    ratio = speed_ratio(speeds, [1.0] * len(speeds)) if speeds else None
    scaled = summarize([dataclasses.replace(r, predicted_ms=r.predicted_ms * r.speed) for r in rows]) \
        if speeds and len(speeds) == len(rows) else None
    if fmt == "json":
        limit = None if summary.repeat_within_10pct is None else (
            "model" if summary.within_10pct < summary.repeat_within_10pct else "noise")
        print(json.dumps({"device": profile.name, "profile_id": profile.profile_id, "measured": where, "limit": limit,
                          "rows": [dataclasses.asdict(r) for r in rows], "summary": summary.to_dict(),
                          "speed_ratio": ratio, "summary_drift_scaled": scaled.to_dict() if scaled else None},
                         indent=2))
        return 0
    print(f"device {profile.name} ({profile.profile_id}), calibrated with {profile.threads} thread(s); {where} "
          f"with {threads} thread(s), same protocol")
    repeated = summary.repeat_within_10pct is not None
    print(f"{'':<22} {'model vs measured':>20}" + (f" {'measured again':>20}" if repeated else ""))
    print(f"{'workload':<18} {'n':>3} {'within ±10%':>12} {'MAPE':>7}"
          + (f" {'within ±10%':>12} {'MAPE':>7}" if repeated else ""))

    def line(name: str, s: Any) -> str:
        again = (f" {s.repeat_within_10pct:>12.0%} {s.repeat_mape:>7.1%}" if s.repeat_within_10pct is not None
                 else (f" {'-':>12} {'-':>7}" if repeated else ""))
        return f"{name:<18} {s.n:>3} {s.within_10pct:>12.0%} {s.mape:>7.1%}" + again

    for w in workloads:
        print(line(w, summarize([r for r in rows if r.workload == w])))
    print(line("all", summary) + f"   Spearman {summary.spearman:.3f}")
    if repeated:
        limit = ("the model limits: it agrees with the measurement less often than the measurement agrees with itself"
                 if summary.within_10pct < summary.repeat_within_10pct else
                 "noise limits: the model agrees with the measurement as often as measuring again does")
        print(f"{limit} ({summary.within_10pct:.0%} vs {summary.repeat_within_10pct:.0%} within ±10%)")
    if ratio is not None and scaled is not None:
        lo, hi = min(speeds), max(speeds)
        print(f"reference kernels ran {abs(ratio - 1):.1%} {'slower' if ratio >= 1 else 'faster'} than during "
              f"calibration ({lo - 1:+.1%} to {hi - 1:+.1%} around the candidates); predictions scaled by that "
              f"drift: {scaled.within_10pct:.0%} within ±10%, MAPE {scaled.mape:.1%} (the model's own error; "
              f"recalibrate when the drift is large)")
    if summary.p95_within_10pct is not None:
        print(f"p95 (each candidate's 95th percentile run against the predicted p95): {summary.p95_within_10pct:.0%} "
              f"within ±10%, MAPE {summary.p95_mape:.1%}")
    print("worst cases:")
    for r in summary.worst:
        print(f"  {r.workload:<18} predicted {r.predicted_ms:8.4f} ms  measured {r.measured_ms:8.4f} ms  "
              f"({r.error:+.1%})  {r.plan}")
    return 0


def register(sub: Any) -> None:
    """Add ``calibrate`` and ``check-latency`` to the CLI's subparsers."""
    p = sub.add_parser("calibrate", help="calibrate a device's latency model (here, as a kit, or from a kit's results)",
                       description=cmd_calibrate.__doc__)
    p.set_defaults(func=cmd_calibrate)
    p.add_argument("--device", help="profile name to write (studies/devices/NAME.json)")
    p.add_argument("--threads", type=int, help="intra-op threads (part of the device identity; default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="<= 3 min on 2 cores (default)")
    mode.add_argument("--full", action="store_true", help="<= 20 min; more points, 3 adaptive rounds")
    p.add_argument("--kit", help="write a calibration kit for a remote device into this folder")
    p.add_argument("--fit", help="build the profile from a kit's measurements.json")
    p.add_argument("--refit", action="store_true",
                   help="fit --device's stored profile again from its own measurements with this "
                        "version's model (no measuring; the old file is kept as .bak)")
    p.add_argument("--for", dest="for_", metavar="MODELS",
                   help="also measure the kernels these models' candidates run: built-in workload names "
                        "(digits-cnn, digits-resnet, resnet18@224, mobilenet_v2@224) or study spec .toml "
                        "files, comma-separated")
    p.add_argument("--power-cmd", help="command printing watts, one reading per line (USB meter, INA219)")
    p.add_argument("--replace", action="store_true", help="replace an existing profile (kept as .bak)")
    p.add_argument("--devices-dir", default="studies/devices")
    p.add_argument("--seed", type=int)

    p = sub.add_parser("check-latency", help="compare a device profile's predictions with measured latency",
                       description=cmd_check_latency.__doc__)
    p.set_defaults(func=cmd_check_latency)
    p.add_argument("--device", required=True, help="calibrated profile to check")
    p.add_argument("--samples", type=int, help="random plans per workload (default 6)")
    p.add_argument("--workloads", help="comma-separated subset of the validation workloads")
    p.add_argument("--threads", type=int, help="measure with this many threads (default: the profile's)")
    p.add_argument("--repeat", action=argparse.BooleanOptionalAction, default=None,
                   help="time every file a second time at the end, to show this machine's measurement noise "
                        "beside the model's error (default on; --no-repeat halves the time)")
    p.add_argument("--kit", metavar="DIR", help="write a check kit for the profile's (remote) device here "
                   "instead of measuring on this machine")
    p.add_argument("--measured", metavar="FILE", help="report on a check kit's measurements.json from the device")
    p.add_argument("--devices-dir", default="studies/devices")
    p.add_argument("--seed", type=int)
    p.add_argument("--format", choices=["table", "json"], default="table")
