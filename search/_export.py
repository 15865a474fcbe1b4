"""Exporting a trial as a shippable, versioned variant: ONNX artifact, re-measured, with a model card."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from edgeslim.objectives import (DEVICES_DIR, RUNTIME_KERNELS, evaluate_onnx_accuracy, FinetuneConfig, batches, build_artifact, evaluate_accuracy,
                                 finetune_, measure_latency, sample_inputs)
from edgeslim.objectives._energy import estimate_energy
from edgeslim.search._front import _deltas, baseline_record, baseline_trial, scored_record, trial_record
from edgeslim.search._pick import SLO, misses
from edgeslim.search._spec import StudySpec, _from_table
from edgeslim.search._study import is_dense, spec_device, study_space
from edgeslim.search._workloads import load_workload
from edgeslim.spaces import Plan, SpecError, layer_bits

__all__ = ["ExportResult", "all_records", "export_variant", "list_variants", "open_study_dir"]

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


def all_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Every completed trial as a front-style record with ``vs_baseline`` deltas."""
    names = list(study.metric_names or [])
    base, refined = baseline_record(study, names), study.user_attrs.get("refined")
    return [scored_record(t, names, base, refined)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


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


def export_variant(study_dir: Path, trial_number: int, out: Path | None = None, storage: str | None = None,
                   finetune_steps: int | None = None, slo: SLO | None = None,
                   devices_dir: Path = DEVICES_DIR, log: Any = print) -> ExportResult:
    """Re-realize a trial's plan, fine-tune it (same seed), export, re-measure, write a model card.

    The dense plan is exported as given, never fine-tuned (as the search scores it).

    The variant lands in ``study_dir/variants/vN`` (never overwriting an earlier version) and,
    with ``out``, is also copied there (``out`` must not already hold a variant).
    """
    study, spec = open_study_dir(study_dir, storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if trial_number not in trials:
        raise SpecError(f"trial {trial_number} is not a completed trial of study {study.study_name!r}; "
                        f"completed: {sorted(trials)[:20]}")
    if out is not None and out.exists() and any(out.iterdir()):
        raise SpecError(f"--out {str(out)!r} is not empty; nothing was written; pick an empty folder")
    trial = trials[trial_number]
    names = list(study.metric_names or [])
    workload = load_workload(spec, study_dir, log)
    if study.user_attrs.get("base_model_hash") not in (None, workload.model_hash):
        raise SpecError("the base model changed since the search; exporting would not reproduce the trial")
    profile = spec_device(spec, devices_dir)
    space = study_space(spec, workload, profile, study)
    plan = Plan.from_dict(trial.user_attrs["plan"])
    torch.manual_seed(spec.seed)
    model = space.realize(workload.model, plan, reduce_range=profile.int8_reduce_range)
    steps = spec.finetune.steps if finetune_steps is None else finetune_steps
    if is_dense(plan):  # the search's policy: the dense baseline is the model as given
        steps = 0
    finetune_(model, workload.data, FinetuneConfig(steps=steps, lr=spec.finetune.lr,
                                                    batch_size=spec.finetune.batch_size), spec.seed)
    torch_acc, torch_per_class = evaluate_accuracy(model, workload.data)
    calib = [t.numpy().astype(np.float32) for t in sample_inputs(workload.data.train, 64, spec.seed)]
    folder = _next_version(study_dir)
    with tempfile.TemporaryDirectory(prefix="edgeslim-export-") as tmp:
        path, runtime_bits, runtime_kernels = build_artifact(model, workload.example_input, layer_bits(model), calib, Path(tmp))
        shutil.copyfile(path, folder / "model.onnx")
    artifact = folder / "model.onnx"
    acc, per_class, ort_pred = evaluate_onnx_accuracy(artifact, workload.data)
    with torch.no_grad():
        torch_pred = np.concatenate([model(x).argmax(1).numpy() for x, _ in batches(workload.data.val, 256)])
    agreement = float((torch_pred == ort_pred).mean())
    lat = measure_latency(artifact, tuple(workload.example_input.shape), threads=profile.threads, seed=spec.seed)
    predicted = None
    if profile.predicts_latency:
        predicted = profile.latency_model.predict_module(model, workload.example_input)[:2]
    energy = estimate_energy(model, workload.example_input, lat.p50_ms, profile.energy)
    base_t = baseline_trial(study)
    base = trial_record(base_t, names) if base_t else {}
    artifact_rec = {"trial": trial_number, "accuracy": acc, "per_class_accuracy": per_class,
                    "size_bytes": artifact.stat().st_size, "latency_ms": lat.p50_ms, "latency_p95_ms": lat.p95_ms,
                    "energy_mj": energy.total_mj}
    artifact_rec["vs_baseline"] = _deltas(artifact_rec, base) if base else {}
    search_rec = trial_record(trial, names)
    flags = []
    if "accuracy" in search_rec and abs(acc - search_rec["accuracy"]) * 100 > ACCURACY_GAP_PP:
        flags.append(f"artifact accuracy {acc:.4f} differs from the search's {search_rec['accuracy']:.4f} by more "
                     f"than {ACCURACY_GAP_PP} pp")
    if "latency_ms" in search_rec and abs(lat.p50_ms / search_rec["latency_ms"] - 1) > LATENCY_GAP:
        flags.append(f"artifact latency {lat.p50_ms:.4f} ms differs from the search's {search_rec['latency_ms']:.4f} ms "
                     f"by more than {LATENCY_GAP:.0%}")
    slo_misses = [str(m) for m in misses(artifact_rec, slo)] if slo else []
    if slo_misses:
        flags.append("the artifact misses the SLO: " + "; ".join(slo_misses))
    drops = artifact_rec["vs_baseline"]
    card = {
        "version": folder.name, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "study": study.study_name, "trial": trial_number, "preset": trial.user_attrs.get("preset", ""),
        "base_model": {"description": workload.description, "sha256_16": workload.model_hash},
        "data": {"split_hash": workload.split_hash, "val_samples": len(workload.data.val),
                 "classes": list(workload.data.class_names)},
        "device": {"name": profile.name, "id": profile.profile_id, "latency": "calibrated profile" if
                   profile.predicts_latency else "measured locally", "energy": "fitted to a power meter"
                   if profile.energy.measured else "estimated from published constants",
                   "int8_reduce_range": profile.int8_reduce_range},
        "plan": plan.to_dict(), "runtime_bits": runtime_bits,
        "runtime_kernels": {n: RUNTIME_KERNELS[k] for n, k in runtime_kernels.items()}, "finetune_steps": steps, "seed": spec.seed,
        "artifact": {"file": "model.onnx", "sha256_16": _sha(artifact), "bytes": artifact.stat().st_size,
                     "accuracy": acc, "per_class_accuracy": per_class, "torch_accuracy": torch_acc,
                     "torch_onnx_top1_agreement": agreement, "latency_p50_ms": lat.p50_ms,
                     "latency_p95_ms": lat.p95_ms, "latency_runs": lat.runs,
                     "latency_predicted_ms": list(predicted) if predicted else None,
                     "energy_mj": energy.total_mj, "energy_method": "estimate" if not profile.energy.measured
                     else "fitted", "vs_baseline": drops},
        "search": {k: search_rec.get(k) for k in (*names, "latency_p95_ms", "latency_method")},
        "baseline": {k: base.get(k) for k in (*names, "latency_p95_ms", "per_class_accuracy")},
        "slo": slo.active() | ({"p95": True} if slo and slo.p95 else {}) if slo else {},
        "slo_misses": slo_misses, "flags": flags, "versions": _versions(),
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2, default=float))
    (folder / "MODEL_CARD.md").write_text(render_card(card))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in ("model.onnx", "card.json", "MODEL_CARD.md"):
            shutil.copyfile(folder / f, out / f)
    return ExportResult(folder.name, folder, card, flags)


def render_card(card: dict[str, Any]) -> str:
    """MODEL_CARD.md from card.json: variant against the dense baseline, side by side."""
    a, b = card["artifact"], card["baseline"]
    rows = [("accuracy (held-out)", a["accuracy"], b.get("accuracy")),
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
