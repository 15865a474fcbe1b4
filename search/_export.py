"""Exporting a trial as a shippable, versioned variant: ONNX artifact, re-measured, with a model card."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from edgeslim.objectives import DEVICES_DIR, RUNTIME_KERNELS, estimate_energy, measure_latency
from edgeslim.search._front import _deltas, baseline_record, trial_record
from edgeslim.search._objective import CompressionObjective, is_dense
from edgeslim.search._pick import SLO, misses
from edgeslim.search._spec import StudySpec, _from_table
from edgeslim.search._study import spec_device, spec_objective
from edgeslim.search._workloads import load_workload
from edgeslim.spaces import Plan, SpecError

__all__ = ["ExportResult", "export_variant", "list_variants", "open_study_dir", "write_variant"]

ACCURACY_GAP_PP = 1.0
LATENCY_GAP = 0.20


def open_study_dir(study_dir: Path, storage: str | None = None) -> tuple[optuna.Study, StudySpec]:
    """Load the study kept in ``study_dir`` (its study.db unless ``storage`` is given) and its spec."""
    if not study_dir.is_dir():
        raise SpecError(f"study folder {str(study_dir)!r} does not exist; pass the folder `edgeslim search` "
                        "wrote (e.g. studies/digits-demo)")
    url = storage or f"sqlite:///{(study_dir / 'study.db').as_posix()}"
    if not storage and not (study_dir / "study.db").is_file():
        raise SpecError(f"{str(study_dir)!r} holds no study.db; give --storage URL for studies kept elsewhere")
    names = optuna.get_all_study_names(url)
    if len(names) != 1:
        raise SpecError(f"storage {url} holds studies {names}; expected exactly one")
    study = optuna.load_study(study_name=names[0], storage=url)
    spec = _from_table(StudySpec, study.user_attrs["spec"], "study").replace(out_dir=str(study_dir))
    return study, spec


@dataclasses.dataclass
class ExportResult:
    """Where a variant went and what its artifact measured."""

    version: str
    folder: Path
    card: dict[str, Any]
    flags: list[str]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("edgeslim", "torch", "onnxruntime", "onnx", "optuna", "torch-pruning"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def list_variants(study_dir: Path) -> list[dict[str, Any]]:
    """The exported versions of a study, oldest first (each one's card.json)."""
    root = study_dir / "variants"
    if not root.is_dir():
        return []
    cards = []
    for d in sorted(root.glob("v*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else 0):
        card = d / "card.json"
        if card.is_file():
            cards.append(json.loads(card.read_text()))
    return cards


def _next_version(study_dir: Path) -> Path:
    root = study_dir / "variants"
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()]
    folder = root / f"v{max(taken, default=0) + 1}"
    folder.mkdir()
    return folder


def write_variant(objective: CompressionObjective, study: optuna.Study, trial_number: int, folder: Path, *,
                  steps: int | None = None, slo: SLO | None = None) -> ExportResult:
    """Score trial ``trial_number``'s plan again through the search's pipeline (same seed and
    fine-tune, accuracy taken on the exported artifact), time the artifact paired with the
    dense model, and write ``model.onnx``, ``card.json`` and ``MODEL_CARD.md`` to ``folder``
    (created; it must not hold files). The dense plan is exported as given, never fine-tuned.

    Example:
        >>> write_variant(objective, study, 12, Path("ship"))  # doctest: +SKIP
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if trial_number not in trials:
        raise SpecError(f"trial {trial_number} is not a completed trial of study {study.study_name!r}; "
                        f"completed: {sorted(trials)[:20]}")
    if folder.exists() and any(folder.iterdir()):
        raise SpecError(f"{str(folder)!r} is not empty; nothing was written; pick an empty folder")
    workload, profile = objective.workload, objective.device
    if study.user_attrs.get("base_model_hash") not in (None, workload.model_hash):
        raise SpecError("the base model changed since the search; exporting would not reproduce the trial")
    trial = trials[trial_number]
    names = list(study.metric_names or [])
    plan = Plan.from_dict(trial.user_attrs["plan"])
    steps = 0 if is_dense(plan) else objective.context.finetune.steps if steps is None else steps
    candidate = objective.score(plan, steps=steps, score_artifact=True, objectives=["accuracy", "size_bytes"])
    model, path = candidate.model, candidate.artifact[0]
    runtime_bits, runtime_kernels = candidate.artifact[1], candidate.artifact[2]
    reference = objective.reference_artifact(measured=True)
    lat = measure_latency(path, tuple(workload.example_input.shape), threads=profile.threads, seed=objective.seed,
                          reference=reference, example=workload.example_input.numpy())
    predicted = profile.latency_model.predict_module(model, workload.example_input)[:2] \
        if profile.predicts_latency else None
    energy = estimate_energy(model, workload.example_input, lat.p50_ms, profile.energy)
    folder.mkdir(parents=True, exist_ok=True)
    artifact = folder / "model.onnx"
    shutil.copyfile(path, artifact)
    m = candidate.metrics
    acc, per_class = m["accuracy"], m["per_class_accuracy"]
    base = baseline_record(study, names)
    artifact_rec = {"trial": trial_number, "accuracy": acc, "per_class_accuracy": per_class,
                    "size_bytes": artifact.stat().st_size, "latency_ms": lat.p50_ms, "latency_p95_ms": lat.p95_ms,
                    "energy_mj": energy.total_mj}
    if lat.speedup is not None:
        artifact_rec.update(latency_speedup_paired=lat.speedup, latency_speedup_spread=list(lat.speedup_spread))
    artifact_rec["vs_baseline"] = _deltas(artifact_rec, base) if base else {}
    search_rec = trial_record(trial, names)
    flags = []
    if "accuracy" in search_rec and abs(acc - search_rec["accuracy"]) * 100 > ACCURACY_GAP_PP:
        flags.append(f"artifact accuracy {acc:.4f} differs from the search's {search_rec['accuracy']:.4f} by more "
                     f"than {ACCURACY_GAP_PP} pp")
    if "latency_ms" in search_rec and abs(lat.p50_ms / search_rec["latency_ms"] - 1) > LATENCY_GAP:
        flags.append(f"artifact latency {lat.p50_ms:.4f} ms differs from the search's {search_rec['latency_ms']:.4f} ms "
                     f"by more than {LATENCY_GAP:.0%}")
    slo_misses = [str(x) for x in misses(artifact_rec, slo)] if slo else []
    if slo_misses:
        flags.append("the artifact misses the SLO: " + "; ".join(slo_misses))
    card = {
        "version": folder.name, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "study": study.study_name, "trial": trial_number, "preset": trial.user_attrs.get("preset", ""),
        "base_model": {"description": workload.description, "sha256_16": workload.model_hash},
        "data": {"split_hash": workload.split_hash, "val_samples": len(workload.data.val),
                 "classes": list(workload.data.class_names), "label_free": workload.data.label_free},
        "device": {"name": profile.name, "id": profile.profile_id, "latency": "calibrated profile" if
                   profile.predicts_latency else "measured locally", "energy": "fitted to a power meter"
                   if profile.energy.measured else "estimated from published constants",
                   "int8_reduce_range": profile.int8_reduce_range},
        "plan": plan.to_dict(), "runtime_bits": runtime_bits,
        "runtime_kernels": {n: RUNTIME_KERNELS[k] for n, k in runtime_kernels.items()}, "finetune_steps": steps,
        "seed": objective.seed,
        "artifact": {"file": "model.onnx", "sha256_16": _sha(artifact), "bytes": artifact.stat().st_size,
                     "accuracy": acc, "per_class_accuracy": per_class, "torch_accuracy": m["torch_accuracy"],
                     "torch_onnx_top1_agreement": m["torch_onnx_agreement"], "latency_p50_ms": lat.p50_ms,
                     "latency_p95_ms": lat.p95_ms, "latency_runs": lat.runs,
                     "latency_speedup_paired": lat.speedup,
                     "latency_predicted_ms": list(predicted) if predicted else None,
                     "energy_mj": energy.total_mj, "energy_method": "estimate" if not profile.energy.measured
                     else "fitted", "vs_baseline": artifact_rec["vs_baseline"]},
        "search": {k: search_rec.get(k) for k in (*names, "latency_p95_ms", "latency_method")},
        "baseline": {k: base.get(k) for k in (*names, "latency_p95_ms", "per_class_accuracy")},
        "slo": slo.active() | ({"p95": True} if slo and slo.p95 else {}) if slo else {},
        "slo_misses": slo_misses, "flags": flags, "versions": _versions(),
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2, default=float))
    (folder / "MODEL_CARD.md").write_text(render_card(card))
    return ExportResult(folder.name, folder, card, flags)


def export_variant(study_dir: Path, trial_number: int, out: Path | None = None, storage: str | None = None,
                   finetune_steps: int | None = None, slo: SLO | None = None,
                   devices_dir: Path = DEVICES_DIR, log: Any = print) -> ExportResult:
    """Export a trial of the study kept in ``study_dir`` (see :func:`write_variant`) as the next
    version, ``study_dir/variants/vN`` (never overwriting an earlier one), and, with ``out``,
    copy it there too (``out`` must not already hold files).

    Example:
        >>> export_variant(Path("studies/digits-demo"), 12).version  # doctest: +SKIP
        'v1'
    """
    study, spec = open_study_dir(study_dir, storage)
    if out is not None and out.exists() and any(out.iterdir()):
        raise SpecError(f"--out {str(out)!r} is not empty; nothing was written; pick an empty folder")
    done = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if trial_number not in done:
        raise SpecError(f"trial {trial_number} is not a completed trial of study {study.study_name!r}; "
                        f"completed: {sorted(done)[:20]}")
    workload = load_workload(spec, study_dir, log)  # write_variant checks the base model is the searched one
    with spec_objective(spec, workload, spec_device(spec, devices_dir), study) as objective:
        folder = _next_version(study_dir)
        try:
            result = write_variant(objective, study, trial_number, folder, steps=finetune_steps, slo=slo)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no half-written version is left behind
            raise
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in ("model.onnx", "card.json", "MODEL_CARD.md"):
            shutil.copyfile(folder / f, out / f)
    return result


def render_card(card: dict[str, Any]) -> str:
    """MODEL_CARD.md from card.json: variant against the dense baseline, side by side."""
    a, b = card["artifact"], card["baseline"]
    label_free = card["data"].get("label_free", False)
    rows = [("agreement with the dense model (held-out, label-free)" if label_free else "accuracy (held-out)",
             a["accuracy"], b.get("accuracy")),
            ("size (bytes)", a["bytes"], b.get("size_bytes")),
            ("latency p50 (ms, measured)", a["latency_p50_ms"], b.get("latency_ms")),
            ("latency p95 (ms, measured)", a["latency_p95_ms"], b.get("latency_p95_ms")),
            ("energy (mJ, ESTIMATE)" if a["energy_method"] == "estimate" else "energy (mJ, fitted)",
             a["energy_mj"], b.get("energy_mj"))]
    table = "\n".join(f"| {n} | {v:.6g} | {'' if w is None else f'{w:.6g}'} |" for n, v, w in rows)
    classes = card["data"]["classes"] or [str(i) for i in range(len(a["per_class_accuracy"]))]
    base_pc = b.get("per_class_accuracy") or [float("nan")] * len(classes)
    per_class = "\n".join(f"| {c} | {x:.4f} | {y:.4f} | {100 * (y - x):+.2f} |"
                          for c, x, y in zip(classes, a["per_class_accuracy"], base_pc))
    kernels = card.get("runtime_kernels", {})
    layers = "\n".join(f"| {n} | {lp['rank']} | {lp['bits']} | {card['runtime_bits'].get(n, lp['bits'])} | "
                       f"{kernels.get(n, '')} |" for n, lp in card["plan"]["layers"].items())
    groups = ", ".join(f"{g}: {s:.2f}" for g, s in card["plan"]["groups"].items()) or "none"
    pred = a.get("latency_predicted_ms")
    flags = "\n".join(f"- {f}" for f in card["flags"]) or "- none"
    return f"""# Model card: {card['study']} {card['version']} (trial {card['trial']})

Base model: {card['base_model']['description']} (state hash {card['base_model']['sha256_16']}).
Data: held-out split of {card['data']['val_samples']} samples (split hash {card['data']['split_hash']}).
Device: {card['device']['name']} {card['device']['id']} — latency {card['device']['latency']}, energy {card['device']['energy']}.
Artifact: `{card['artifact']['file']}` sha256 {card['artifact']['sha256_16']}, {a['bytes']} bytes.
Seed {card['seed']}, fine-tune steps {card['finetune_steps']}. SLO: {card['slo'] or 'none'}.

## Variant against the dense baseline
| metric | this variant (artifact) | dense baseline (search) |
|---|---|---|
{table}

Largest per-class drop: {a['vs_baseline'].get('max_class_drop_pp', float('nan')):.2f} pp.
Torch/ONNX top-1 agreement on the held-out split: {a['torch_onnx_top1_agreement']:.4f}.
Predicted latency (profile): {pred if pred else 'n/a (measured locally)'}.

## Per-class accuracy
| class | variant | baseline | baseline − variant (pp) |
|---|---|---|---|
{per_class}

## Plan
Channel sparsity per pruning group: {groups}

| layer | rank ratio | planned bits | bits in the artifact | runs as |
|---|---|---|---|---|
{layers}

## Flags
{flags}

## Versions
{', '.join(f'{k} {v}' for k, v in card['versions'].items())}
"""
