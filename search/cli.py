"""The ``edgeslim`` command line: one function per subcommand, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "COMMANDS"]


def _spec_from_args(args: argparse.Namespace) -> Any:
    from edgeslim.search._spec import DeviceSpec, demo_spec, load_spec

    spec = load_spec(args.spec) if args.spec else demo_spec()
    changes: dict[str, Any] = {}
    if args.workload:
        changes["model"] = dataclasses.replace(spec.model, builtin=args.workload, factory="", torchvision="")
        if not args.spec and not args.name:
            changes["name"] = args.workload
    for key in ("trials", "storage", "sampler", "seed", "name"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = value
    if args.out:
        changes["out_dir"] = args.out
    if args.device or args.threads:
        changes["device"] = DeviceSpec(name=args.device or spec.device.name,
                                       threads=args.threads or spec.device.threads)
    if getattr(args, "score", None):
        changes["finetune"] = dataclasses.replace(spec.finetune, score=args.score)
    from edgeslim.search._budgets import SEARCH_BUDGETS

    budgets = {k: getattr(args, k) for k in SEARCH_BUDGETS if getattr(args, k, None) is not None}
    if budgets:
        changes["budgets"] = dataclasses.replace(spec.budgets, **budgets)
    return spec.replace(**changes) if changes else spec


def _front_table(front: list[dict[str, Any]], names: list[str]) -> str:
    refined = any(e.get("refined") for e in front)
    header = (f"{'trial':>5} {'preset':<24} {'acc':>7} " + (f"{'search':>7} " if refined else "")
              + f"{'Δacc pp':>8} {'size KB':>9} {'lat ms':>8} {'p95 ms':>8} {'x dense':>8} {'energy mJ*':>10}  plan")
    lines = [header, "-" * len(header)]
    for e in front:
        vs = e.get("vs_baseline", {})
        search = e.get("search", {}).get("accuracy", float("nan")) if e.get("refined") else float("nan")
        lines.append(
            f"{e['trial']:>5} {e.get('preset', '')[:24]:<24} {e.get('accuracy', float('nan')):>7.4f} "
            + (f"{search:>7.4f} " if refined else "")
            + f"{vs.get('accuracy_drop_pp', float('nan')):>8.2f} {e.get('size_bytes', float('nan')) / 1e3:>9.2f} "
            f"{e.get('latency_ms', float('nan')):>8.4f} {e.get('latency_p95_ms', float('nan')):>8.4f} "
            f"{vs.get('latency_speedup', float('nan')):>8.2f} "
            f"{e.get('energy_mj', float('nan')):>10.4f}  {e.get('plan_summary', '')}")
    lines.append("* energy is an estimate from documented constants, not a measurement"
                 + ("; x dense: latency ratio timed side by side with the dense artifact"
                    if any("latency_speedup_paired" in e for e in front) else ""))
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    """Run or resume a study; print the front and the report path."""
    from edgeslim.search._study import run_search

    spec = _spec_from_args(args)
    result = run_search(spec, devices_dir=Path(args.devices_dir))
    if args.format == "json":
        print(json.dumps(result.front, indent=2, default=float))
        return 0
    print(_front_table(result.front, result.objective_names))
    if not result.front and spec.budgets.active():
        print(f"no completed trial meets the budgets {spec.budgets.active()}; relax them or run more trials")
    print(f"\nreport: {result.report_path}\nfront:  {result.out_dir / 'pareto.json'}  "
          f"{result.out_dir / 'pareto.csv'}\nstudy:  {spec.storage_url} (re-run the same command to add trials)")
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    """List the model's layers, pruning groups and knobs without searching."""
    from edgeslim.search._study import spec_device, study_space
    from edgeslim.search._workloads import load_workload

    spec = _spec_from_args(args)
    work = load_workload(spec, spec.output_dir, lambda m: print(m, file=sys.stderr))
    space = study_space(spec, work, spec_device(spec, Path(args.devices_dir)))
    if args.format == "json":
        print(json.dumps({
            "layers": [dataclasses.asdict(l) for l in space.layers],
            "groups": [dataclasses.asdict(g) for g in space.groups],
            "knobs": {k: list(d.choices) for k, d in space.distributions().items()},
            "excluded": space.excluded,
        }, indent=2))
        return 0
    print(f"{'layer':<28} {'kind':<7} {'in':>5} {'out':>5} {'kernel':<8} {'groups':>6} {'params':>9} {'MACs':>11}")
    for l in space.layers:
        print(f"{l.name:<28} {l.kind:<7} {l.in_channels:>5} {l.out_channels:>5} {str(l.kernel_size):<8} "
              f"{l.groups:>6} {l.params:>9} {l.macs:>11}")
    print("\npruning groups (coupled layers share one sparsity knob):")
    for g in space.groups:
        print(f"  {g.name:<26} {g.channels:>5} ch  members: {', '.join(g.members)}")
    print("\nknobs:")
    for name, dist in space.distributions().items():
        print(f"  {name:<36} {list(dist.choices)}")
    for name, why in space.excluded.items():
        print(f"  left out of pruning: {name}: {why}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a device's latency model: here (--device), as a kit for a remote device (--kit),
    or from a kit's measurements (--fit); --refit fits a stored profile's measurements again."""
    import tempfile

    if args.refit:
        return _refit(args)
    with tempfile.TemporaryDirectory(prefix="edgeslim-nets-") as net_dir:  # focus networks' ONNX files
        return _calibrate_with(args, Path(net_dir))


def _refit(args: argparse.Namespace) -> int:
    """``calibrate --refit``: the profile's model fitted again from its stored measurements."""
    import datetime as dt

    from edgeslim.objectives import _calibrate
    from edgeslim.objectives._device import DeviceProfile, ProfileError, known_devices

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
    data = DeviceProfile.read_document(target)
    if not isinstance(data, dict):
        raise ProfileError(f"device profile {str(target)!r} is not a profile document; calibrate it again")
    try:
        result = _calibrate.refit(data, args.device)
    except (ValueError, TypeError, KeyError) as e:
        raise ProfileError(f"device profile {str(target)!r}: {e}") from None
    at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    # the rest of the document (facts, energy, measurements, id) is validated as any profile is
    profile = DeviceProfile.from_dict({**data, "model": result.model.to_dict(),
                                       "refit": {"at": at, "from_model_of": data.get("created")}},
                                      where=f"device profile {str(target)!r}")
    path = profile.save(target, replace=True)
    print(f"re-fitted {path} from its {len(result.kernels)} stored measurements and "
          f"{len(result.chains)} chains/networks with this version's model; the previous file is kept as .bak")
    return 0


def _calibrate_with(args: argparse.Namespace, net_dir: Path) -> int:
    import datetime as dt
    import os

    from edgeslim.objectives import _calibrate, _runner, kernel_type, probe_nchwc_block
    from edgeslim.objectives._device import DeviceProfile, EnergyConstants, ProfileError, profile_id
    from edgeslim.search._progress import Progress

    cores = os.cpu_count() or 1
    threads = args.threads or 1
    if threads > cores:
        raise ProfileError(f"--threads {threads} exceeds this machine's {cores} cores; use at most {cores}")
    mode = "full" if args.full else "quick"
    devices = Path(args.devices_dir)
    targets = [t for t in (args.for_ or "").split(",") if t]
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
    focus: list[Any] = []
    focus_plans: dict[str, int] = {}
    networks: list[dict[str, Any]] = []
    if targets:
        from edgeslim.search._check import FOCUS_PLANS, focus_networks, workload_kernels

        fbar = Progress(1, "focus plans")

        def fprogress(done: int, total: int) -> None:
            fbar.total = total
            fbar.update(done)

        budget = FOCUS_PLANS[mode]
        focus, focus_plans = workload_kernels(targets, budget["min"], budget["max"], budget["seconds"],
                                              args.seed or 0, fprogress)
        nbar = Progress(1, "focus networks exported")

        def nprogress(done: int, total: int) -> None:
            nbar.total = total
            nbar.update(done)

        networks = focus_networks(targets, budget["networks"], net_dir, args.seed or 0, nprogress)
        print(f"focus: {len(focus)} distinct kernels from " + ", ".join(
            f"{t} ({n} plans)" for t, n in focus_plans.items()) + f", and {len(networks)} whole networks",
            file=sys.stderr)
    if args.kit:
        kit = _calibrate.write_kit(Path(args.kit), threads, mode, args.seed or 0, focus,
                                   {"plans": focus_plans, "kernels": len(focus), "networks": len(networks)}
                                   if targets else None, networks)
        n = len(list((kit / "models").glob("*.onnx")))
        print(f"wrote kit {kit} ({n} micro-models, {mode} design, {threads} thread(s)). On the device:\n"
              f"  1. copy {kit} there; it needs Python 3, numpy and onnxruntime only\n"
              f"  2. python {kit / 'run_kit.py'} {kit} --out measurements.json\n"
              f"  3. back here: edgeslim calibrate --fit measurements.json --device NAME")
        return 0
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    energy = EnergyConstants()
    if args.fit:
        data = read_kit_results(args.fit, "run_kit.py", "edgeslim calibrate --kit")
        if data.get("purpose") == "check":
            raise ProfileError(f"{args.fit!r} holds a check kit's measurements, not a calibration's; report on them "
                               f"with `edgeslim check-latency --device {data.get('device', 'NAME')} --measured {args.fit}`")
        try:
            result = _calibrate.fit_measurements(data, args.device)
            facts, protocol = data["facts"], data["protocol"]
            threads = int(facts.get("threads", threads))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ProfileError(f"{args.fit!r} is malformed ({type(e).__name__}: {e}); nothing was written; "
                               "run run_kit.py on the device again") from None
    else:
        reader, meter = None, "none"
        if args.power_cmd:
            from edgeslim.objectives._power import PowerCommandReader

            reader, meter = PowerCommandReader(args.power_cmd), f"power command `{args.power_cmd}`"
        else:
            from edgeslim.objectives._power import find_rapl

            reader = find_rapl()
            meter = f"RAPL {reader.zone}" if reader else "none"
        print(f"calibrating {args.device!r}: {mode} mode, {threads} thread(s), power meter: {meter}", file=sys.stderr)
        bar = Progress(1, "micro-models")

        def progress(done: int, total: int) -> None:
            bar.total = total
            if done == total or done % 10 == 0:
                bar.update(done)

        def say(text: str) -> None:
            print(f"\n{text}", file=sys.stderr)

        result = _calibrate.calibrate(args.device, threads, mode, args.seed or 0, progress, reader, focus=focus,
                                      networks=networks, say=say)
        facts, protocol = _runner.device_facts(threads), dict(_runner.PROTOCOL)
        facts["nchwc_block"] = probe_nchwc_block()  # what [space] channel_multiple = 0 rounds to
        if reader is not None:
            fitted = _calibrate.fit_energy(result.kernels, result.measurements,
                                           f"fitted to {meter} readings during calibration on {created}")
            energy = fitted or energy
            if hasattr(reader, "close"):
                reader.close()
    extra = {
        "created": created, "mode": mode if not args.fit else data.get("mode", "kit"), "protocol": protocol,
        "rounds": result.rounds,
        "measurements": [{"kernel": dataclasses.asdict(k), "type": kernel_type(k), **m}
                         for k, m in zip(result.kernels, result.measurements)],
        "chains": result.chains,
    }
    if result.track is not None and result.track.points:
        extra["reference"] = {"kernels": [dataclasses.asdict(k) for k in _calibrate.REFERENCE_KERNELS],
                              "p50_ms": result.track.reference()}
        extra["speed_track"] = result.track.to_dict()
    remeasured = result.remeasured if not args.fit else data.get("remeasured")
    if remeasured:
        extra["remeasured"] = remeasured
    if targets:
        extra["focus"] = {"plans": focus_plans, "kernels": len(focus), "networks": len(networks)}
    elif args.fit and data.get("focus"):
        extra["focus"] = data["focus"]
    profile = DeviceProfile(name=args.device, threads=threads, energy=energy, latency_model=result.model,
                            facts=facts, profile_id=profile_id(facts, created), extra=extra)
    path = profile.save(target, replace=args.replace)
    print(f"wrote {path}: {len(result.kernels)} micro-models over {len(result.model.types_)} kernel types and "
          f"{sum('chain' in c for c in result.chains)} kernel chains, "
          f"{sum('network' in c for c in result.chains)} whole networks, "
          f"per-inference overhead {result.model.overhead_[0][1] * 1e3:.1f} us; energy "
          f"{'fitted to the power meter' if energy.measured else 'uses documented default constants (estimate)'}")
    if result.track is not None and len(result.track.points) >= 3:
        f = [result.track.factor(s) for s, _ in result.track.points]
        print(f"  device speed over the calibration: {min(f) - 1:+.1%} to {max(f) - 1:+.1%} around its median "
              f"({len(f)} timings of the reference kernels; stretches over {_runner.EXCURSION:.0%} off are "
              f"measured again, smaller drift is recorded, not corrected for)")
    if remeasured:
        print("  " + remeasure_line(remeasured))
    for r in result.rounds:
        print(f"  adaptive round {r['round']}: held-out MAPE {r['heldout_mape']:.1%}, "
              f"within 10% {r['heldout_within_10pct']:.0%} over {r['points']} new kernels")
    print(f"check it: edgeslim check-latency --device {args.device}")
    return 0


def foreign_device(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
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


def remeasure_line(r: dict[str, Any]) -> str:
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


def read_kit_results(name: str, runner: str, new_kit: str) -> dict[str, Any]:
    """The measurements a kit's ``runner`` wrote on the device, refused in one line when the file
    is missing or comes from another kit version (``new_kit``: the command that writes a new kit).

    Example:
        >>> read_kit_results("measurements.json", "run_kit.py", "edgeslim calibrate --kit")  # doctest: +SKIP
    """
    from edgeslim.objectives import _runner
    from edgeslim.objectives._device import ProfileError

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
    from edgeslim.objectives import _calibrate, _runner, load_device
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
                                ("--threads", args.threads), ("--seed", args.seed), ("--repeat", args.repeat)) if v]
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
    if reference and len(reference) != len(_calibrate.REFERENCE_KERNELS):
        reference = None
    if args.kit:
        kit = Path(args.kit)
        fresh_dir(kit, "--kit")
        if args.threads and args.threads != profile.threads:
            raise SpecError(f"--threads {args.threads}: a check kit measures with the profile's {profile.threads} "
                            f"thread(s); run_kit.py --threads N on the device measures with another count")
        bar = Progress(samples * len(workloads), "candidates exported")
        write_check_kit(profile, kit, samples, args.seed or 0, workloads, args.repeat, lambda d, t: bar.update(d))
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
        other = foreign_device(profile.facts, _runner.device_facts(args.threads or profile.threads))
        if other:
            print(f"warning: check-latency measures on this machine, and it is not the one {profile.name!r} was "
                  f"calibrated on ({other}): the figures compare two devices; run it on the device itself, "
                  f"or write a check kit for it with --kit", file=sys.stderr)
        bar = Progress(samples * len(workloads), "candidates")
        bar.total *= 2 if args.repeat else 1
        rows = check_latency(profile, samples, args.seed or 0, workloads, lambda d, t: bar.update(d),
                             args.threads, args.repeat, reference)
        where, threads = "measured here", args.threads or profile.threads
    return _report_check(profile, rows, workloads, where, threads, args.format)


def _report_check(profile: Any, rows: Sequence[Any], workloads: Sequence[str], where: str, threads: int,
                  fmt: str) -> int:
    """Print check-latency's table (or JSON): overall and per workload, drift-scaled, p95, repeats, worst cases."""
    from edgeslim.objectives import _calibrate
    from edgeslim.search._check import summarize

    summary = summarize(rows)
    # how much slower (>1) the reference kernels ran around each measurement than during
    # calibration, and what the predictions score scaled by it: drift of the device, not error of the model
    speeds = [r.speed for r in rows if r.speed is not None]
    ratio = _calibrate.speed_ratio(speeds, [1.0] * len(speeds)) if speeds else None
    scaled = summarize([dataclasses.replace(r, predicted_ms=r.predicted_ms * r.speed) for r in rows]) \
        if speeds and len(speeds) == len(rows) else None
    if fmt == "json":
        print(json.dumps({"device": profile.name, "profile_id": profile.profile_id, "measured": where,
                          "rows": [dataclasses.asdict(r) for r in rows], "summary": summary.to_dict(),
                          "speed_ratio": ratio, "summary_drift_scaled": scaled.to_dict() if scaled else None},
                         indent=2))
        return 0
    print(f"device {profile.name} ({profile.profile_id}), calibrated with {profile.threads} thread(s); {where} "
          f"with {threads} thread(s), same protocol")
    print(f"{'workload':<18} {'n':>3} {'within ±10%':>12} {'MAPE':>7}")
    for w in workloads:
        s = summarize([r for r in rows if r.workload == w])
        print(f"{w:<18} {s.n:>3} {s.within_10pct:>12.0%} {s.mape:>7.1%}")
    print(f"{'all':<18} {summary.n:>3} {summary.within_10pct:>12.0%} {summary.mape:>7.1%}   "
          f"Spearman {summary.spearman:.3f}")
    if ratio is not None and scaled is not None:
        lo, hi = min(speeds), max(speeds)
        print(f"reference kernels ran {abs(ratio - 1):.1%} {'slower' if ratio >= 1 else 'faster'} than during "
              f"calibration ({lo - 1:+.1%} to {hi - 1:+.1%} around the candidates); predictions scaled by that "
              f"drift: {scaled.within_10pct:.0%} within ±10%, MAPE {scaled.mape:.1%} (the model's own error; "
              f"recalibrate when the drift is large)")
    if summary.p95_within_10pct is not None:
        print(f"p95 (each candidate's 95th percentile run against the predicted p95): {summary.p95_within_10pct:.0%} "
              f"within ±10%, MAPE {summary.p95_mape:.1%}")
    if summary.repeat_within_10pct is not None:
        print(f"measured again: {summary.repeat_within_10pct:.0%} of the files within ±10% of their first "
              f"measurement (mean deviation {summary.repeat_mape:.1%}): what noise leaves any predictor here")
    print("worst cases:")
    for r in summary.worst:
        print(f"  {r.workload:<18} predicted {r.predicted_ms:8.4f} ms  measured {r.measured_ms:8.4f} ms  "
              f"({r.error:+.1%})  {r.plan}")
    return 0


def _slo_from_args(args: argparse.Namespace) -> Any:
    from edgeslim.search._pick import SLO
    from edgeslim.spaces import SpecError

    try:
        return SLO(max_latency_ms=args.max_latency_ms, p95=args.p95, max_size_kb=args.max_size_kb,
                   max_energy_mj=args.max_energy_mj, min_accuracy=args.min_accuracy,
                   max_accuracy_drop_pp=args.max_accuracy_drop, max_class_drop_pp=args.max_class_drop)
    except ValueError as e:
        raise SpecError(str(e)) from None


def cmd_pick(args: argparse.Namespace) -> int:
    """Pick the most accurate variant meeting every budget; optionally export it."""
    from edgeslim.search._export import all_records, export_variant, open_study_dir
    from edgeslim.search._pick import NoFitError, select

    slo = _slo_from_args(args)
    study, _ = open_study_dir(Path(args.study), args.storage)
    records = all_records(study)
    try:
        best = select(records, slo)
    except NoFitError as e:
        print(f"edgeslim: {e}", file=sys.stderr)
        return 3
    vs = best.get("vs_baseline", {})
    print(f"picked trial {best['trial']} ({best.get('preset') or 'searched'}): accuracy {best['accuracy']:.4f} "
          f"({0.0 - vs.get('accuracy_drop_pp', 0):+.2f} pp, worst class {0.0 - vs.get('max_class_drop_pp', 0):+.2f} pp), "
          f"size {best['size_bytes'] / 1e3:.1f} kB, latency p50 {best['latency_ms']:.4f} / p95 "
          f"{best.get('latency_p95_ms', float('nan')):.4f} ms, energy {best.get('energy_mj', float('nan')):.4f} mJ "
          f"(estimate); plan: {best.get('plan_summary', '')}")
    if args.format == "json":
        print(json.dumps(best, indent=2, default=float))
    _redraw_report(Path(args.study), study, slo, best["trial"])
    if not args.export:
        return 0
    result = export_variant(Path(args.study), best["trial"], Path(args.export), args.storage,
                            args.finetune_steps, slo, Path(args.devices_dir),
                            log=lambda m: print(m, file=sys.stderr))
    return _report_export(result)


def _redraw_report(study_dir: Any, study: Any, slo: Any, picked: int) -> None:
    """Re-draw report.html with the SLO shaded and the pick highlighted (the report is derived data)."""
    from edgeslim.search._front import front_entries
    from edgeslim.search._report import build_report_data, render_report

    names = list(study.metric_names or [])
    from edgeslim.search._budgets import SEARCH_BUDGETS

    budgets = {k: v for k, v in slo.active().items() if k in SEARCH_BUDGETS}
    data = build_report_data(study, names, front_entries(study, names), budgets,
                             f"edgeslim study {study.study_name}: pick under {slo.active()}", picked)
    path = render_report(data, study_dir / "report.html")
    print(f"report: {path} (SLO shaded, pick highlighted)")


def _report_export(result: Any) -> int:
    a, s = result.card["artifact"], result.card["search"]
    print(f"exported {result.version} to {result.folder}: {a['bytes']} bytes, accuracy {a['accuracy']:.4f} "
          f"(search {s.get('accuracy', float('nan')):.4f}, torch/ONNX agreement {a['torch_onnx_top1_agreement']:.4f}), "
          f"latency p50 {a['latency_p50_ms']:.4f} ms (search {s.get('latency_ms', float('nan')):.4f} ms), "
          f"p95 {a['latency_p95_ms']:.4f} ms")
    for flag in result.flags:
        print(f"  FLAG: {flag}")
    return 1 if result.card["slo_misses"] else 0


def cmd_refine(args: argparse.Namespace) -> int:
    """Fine-tune the front (and trials near it) longer and re-score each on its exported artifact."""
    from edgeslim.search._refine import refine_study

    result = refine_study(Path(args.study), args.storage, args.steps, args.lr, args.margin_pp,
                          Path(args.devices_dir))
    if args.format == "json":
        print(json.dumps(result.front, indent=2, default=float))
        return 0
    names = [n for n in ("accuracy", "size_bytes", "latency_ms", "energy_mj") if result.front and n in result.front[0]]
    print(_front_table(result.front, names))
    print(f"refined {len(result.trials)} trials ({result.steps} steps at lr {result.lr:g}) in "
          f"{result.seconds:.0f} s; accuracy is the exported artifact's, against the dense baseline's artifact\n"
          f"front:  {result.out_dir / 'pareto.json'}  {result.out_dir / 'pareto.csv'}\n"
          f"report: {result.out_dir / 'report.html'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export one trial as a versioned ONNX variant with a model card."""
    from edgeslim.search._export import export_variant

    result = export_variant(Path(args.study), args.trial, Path(args.out) if args.out else None, args.storage,
                            args.finetune_steps, None, Path(args.devices_dir),
                            log=lambda m: print(m, file=sys.stderr))
    return _report_export(result)


def cmd_variants(args: argparse.Namespace) -> int:
    """List a study's exported variants (kept for rollback)."""
    from edgeslim.search._export import list_variants

    cards = list_variants(Path(args.study))
    if args.format == "json":
        print(json.dumps(cards, indent=2, default=float))
        return 0
    if not cards:
        print(f"no variants exported in {args.study} yet; run `edgeslim export` or `edgeslim pick --export`")
        return 0
    print(f"{'version':<8} {'trial':>5} {'created':<26} {'accuracy':>8} {'size KB':>8} {'p50 ms':>8} {'p95 ms':>8}  flags")
    for c in cards:
        a = c["artifact"]
        print(f"{c['version']:<8} {c['trial']:>5} {c['created']:<26} {a['accuracy']:>8.4f} {a['bytes'] / 1e3:>8.1f} "
              f"{a['latency_p50_ms']:>8.4f} {a['latency_p95_ms']:>8.4f}  {len(c['flags'])}")
    return 0


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="study spec (TOML); default: the built-in digits demo")
    from edgeslim.search._registry import BUILTIN_WORKLOADS

    p.add_argument("--workload", choices=list(BUILTIN_WORKLOADS),
                   help="built-in model instead of the spec's (digits-resnet: residual, >= 1 ms)")
    p.add_argument("--name", help="study name (default from the spec)")
    p.add_argument("--out", help="output folder (default studies/<name>)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite in the output folder)")
    p.add_argument("--device", help="target device; 'local' measures on this machine")
    p.add_argument("--threads", type=int, help="intra-op threads for latency measurement")
    p.add_argument("--seed", type=int)
    p.add_argument("--devices-dir", default="studies/devices", help="where calibrated profiles live")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--score", choices=["torch", "artifact"],
                   help="accuracy of the fine-tuned torch candidate (default) or of its exported ONNX artifact")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeslim",
        description="Search channel sparsity x low rank x bit-width for an edge device; "
                    "get a Pareto front of accuracy against size, latency and energy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=fn.__doc__)
        p.set_defaults(func=fn)
        if name == "calibrate":
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
            continue
        if name in ("pick", "export", "variants"):
            p.add_argument("study", help="study folder written by `edgeslim search` (e.g. studies/digits-demo)")
            p.add_argument("--format", choices=["table", "json"], default="table")
            if name == "variants":
                continue
            p.add_argument("--storage", help="Optuna storage URL when the study is not in STUDY/study.db")
            p.add_argument("--finetune-steps", type=int, help="fine-tune longer before export (default: as searched)")
            p.add_argument("--devices-dir", default="studies/devices")
            if name == "export":
                p.add_argument("--trial", type=int, required=True)
                p.add_argument("--out", help="also copy the variant here (must be empty)")
                continue
            p.add_argument("--export", metavar="DIR", help="export the pick (also kept in STUDY/variants/vN)")
            p.add_argument("--max-latency-ms", type=float)
            p.add_argument("--p95", action="store_true", help="apply --max-latency-ms to p95, not p50")
            p.add_argument("--max-size-kb", type=float)
            p.add_argument("--max-energy-mj", type=float)
            acc = p.add_mutually_exclusive_group()
            acc.add_argument("--min-accuracy", type=float)
            acc.add_argument("--max-accuracy-drop", type=float, help="percentage points below the dense baseline")
            p.add_argument("--max-class-drop", type=float, help="largest per-class drop allowed (pp)")
            continue
        if name == "refine":
            p.add_argument("study", help="study folder written by `edgeslim search` (e.g. studies/digits-demo)")
            p.add_argument("--steps", type=int, help="fine-tune steps (default [refine] steps, else 10x the search's)")
            p.add_argument("--lr", type=float, help="learning rate (default [refine] lr, else the search's)")
            p.add_argument("--margin-pp", type=float,
                           help="also refine trials this many accuracy points from the front (default 0.5)")
            p.add_argument("--storage", help="Optuna storage URL when the study is not in STUDY/study.db")
            p.add_argument("--devices-dir", default="studies/devices")
            p.add_argument("--format", choices=["table", "json"], default="table")
            continue
        if name == "check-latency":
            p.add_argument("--device", required=True, help="calibrated profile to check")
            p.add_argument("--samples", type=int, help="random plans per workload (default 6)")
            p.add_argument("--workloads", help="comma-separated subset of the validation workloads")
            p.add_argument("--threads", type=int, help="measure with this many threads (default: the profile's)")
            p.add_argument("--repeat", action="store_true",
                           help="time every file a second time at the end, to show this machine's measurement noise")
            p.add_argument("--kit", metavar="DIR", help="write a check kit for the profile's (remote) device here "
                           "instead of measuring on this machine")
            p.add_argument("--measured", metavar="FILE", help="report on a check kit's measurements.json from the device")
            p.add_argument("--devices-dir", default="studies/devices")
            p.add_argument("--seed", type=int)
            p.add_argument("--format", choices=["table", "json"], default="table")
            continue
        _add_spec_options(p)
        if name == "search":
            p.add_argument("--trials", type=int, help="trials to add in this run")
            from edgeslim.search._registry import SAMPLERS

            p.add_argument("--sampler", help="; ".join(f"{k}: {v}" for k, v in SAMPLERS.items()))
            from edgeslim.search._budgets import BUDGETS, SEARCH_BUDGETS

            for budget in SEARCH_BUDGETS:
                p.add_argument("--" + budget.replace("_", "-"), type=float, help=f"budget: {BUDGETS[budget].help}")
    return parser


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "search": (cmd_search, "run or resume a compression search (default: built-in digits demo)"),
    "inventory": (cmd_inventory, "list layers, pruning groups and knobs of a study's model"),
    "calibrate": (cmd_calibrate, "calibrate a device's latency model (here, as a kit, or from a kit's results)"),
    "check-latency": (cmd_check_latency, "compare a device profile's predictions with measured latency"),
    "pick": (cmd_pick, "pick the best variant under an SLO (exit 3 with the nearest misses if none fits)"),
    "refine": (cmd_refine, "fine-tune the front longer and re-score it on the exported artifacts"),
    "export": (cmd_export, "export a trial as a versioned ONNX variant with a model card"),
    "variants": (cmd_variants, "list a study's exported variants"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeslim`` console script; returns the exit code.

    Usage errors (bad options, bad spec, impossible space) exit 2; other edgeslim errors 1.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("edgeslim: error: choose a command, e.g. `edgeslim search`", file=sys.stderr)
        return 2
    for key in ("trials", "threads", "samples", "finetune_steps", "steps"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            parser.print_usage(sys.stderr)
            print(f"edgeslim: error: --{key} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from edgeslim.spaces import EdgeslimError, SpaceError, SpecError

    try:
        return args.func(args)
    except (SpecError, SpaceError) as e:
        parser.print_usage(sys.stderr)
        print(f"edgeslim: error: {e}", file=sys.stderr)
        return 2
    except EdgeslimError as e:
        print(f"edgeslim: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nedgeslim: interrupted; finished trials are stored, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
