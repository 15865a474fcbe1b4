"""report.html: computed first as plain ReportData (testable with ==), drawn with plotly last."""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from edgeslim.search._budgets import BUDGETS

__all__ = ["ReportData", "build_report_data", "pair_front", "render_report"]

LABELS = {
    "accuracy": "accuracy (held-out)",
    "size_bytes": "size (bytes)",
    "latency_ms": "latency p50 (ms)",
    "energy_mj": "energy (mJ, ESTIMATED)",
}


@dataclasses.dataclass(frozen=True)
class ReportData:
    """Everything the report shows, as plain values.

    ``points`` has one dict per completed trial (``trial``, objective values, ``preset``,
    ``front``); ``decisions`` one dict per Pareto variant with its per-group sparsity and
    per-layer rank and bits.
    """

    title: str
    names: tuple[str, ...]
    points: tuple[dict[str, Any], ...]
    baseline_trial: int | None
    budgets: dict[str, float]
    groups: tuple[str, ...]
    layers: tuple[str, ...]
    decisions: tuple[dict[str, Any], ...]
    front: tuple[dict[str, Any], ...]
    failed: tuple[tuple[int, str], ...]
    latency_method: str
    energy_method: str
    device: str
    class_deltas: tuple[tuple[int, tuple[float, ...]], ...] = ()
    picked: int | None = None
    label_free: bool = False  # "accuracy" is agreement with the dense model's top-1
    # cost name -> trials on the accuracy-vs-that-cost front, cheapest first
    pair_fronts: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # the sensitivity sampler's profile (rows, cols, z: accuracy drop in pp, seconds, samples) and the
    # solve's record (weights, proposals, front trials it proposed); None for other samplers
    sensitivity: dict[str, Any] | None = None
    surrogate: dict[str, Any] | None = None


def pair_front(points: list[dict[str, Any]], cost: str) -> list[int]:
    """Trials no other trial beats on both accuracy (higher) and ``cost`` (lower), cheapest
    first: the staircase of one report panel.

    Example:
        >>> pts = [{"trial": 0, "accuracy": 0.99, "size_bytes": 100}, {"trial": 1, "accuracy": 0.95, "size_bytes": 20},
        ...        {"trial": 2, "accuracy": 0.90, "size_bytes": 50}, {"trial": 3, "accuracy": 0.95, "size_bytes": 30}]
        >>> pair_front(pts, "size_bytes")
        [1, 0]
    """
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[cost], -p["accuracy"], p["trial"])):
        if p["accuracy"] > best:  # cheapest first: a point stays only if more accurate than all cheaper ones
            out.append(p["trial"])
            best = p["accuracy"]
    return out


def build_report_data(study: optuna.Study, names: list[str], front: list[dict[str, Any]],
                      budgets: dict[str, float], title: str, picked: int | None = None) -> ReportData:
    """Collect the report's data from a study and its front entries.

    ``budgets`` are shaded on the plots (search budgets or a pick's SLO, in the search's
    budget names); ``picked`` is highlighted.
    """
    on_front = {e["trial"] for e in front}
    points, failed = [], []
    base = None
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            p = {"trial": t.number, "preset": t.user_attrs.get("preset", ""), "front": t.number in on_front,
                 "summary": str(t.user_attrs.get("plan_summary", ""))}
            p.update(zip(names, t.values))
            points.append(p)
            if p["preset"] == "dense":
                base = t.number
        elif t.state == TrialState.FAIL:
            # no reason recorded: its worker died mid-trial and the heartbeat check failed it
            failed.append((t.number, str(t.user_attrs.get("fail_reason", "its worker stopped (killed or lost: no "
                                                                        "heartbeat); the plan was retried once"))))
    plans = [e.get("plan") or {} for e in front]
    groups = sorted({g for p in plans for g in p.get("groups", {})})
    layers = sorted({l for p in plans for l in p.get("layers", {})})
    decisions = []
    for e, plan in zip(front, plans):
        decisions.append({
            "trial": e["trial"],
            "sparsity": {g: plan.get("groups", {}).get(g, 0.0) for g in groups},
            "rank": {l: plan.get("layers", {}).get(l, {}).get("rank", 1.0) for l in layers},
            "bits": {l: plan.get("layers", {}).get(l, {}).get("bits", 32) for l in layers},
        })
    deltas = []
    for e in front:
        base_pc = e.get("baseline", {}).get("per_class_accuracy")
        if base_pc and e.get("per_class_accuracy"):
            deltas.append((e["trial"], tuple(round(100 * (a - b), 2) for a, b in zip(e["per_class_accuracy"], base_pc))))
    first = front[0] if front else {}
    sensitivity, surrogate = _sensitivity_of(study, on_front)
    return ReportData(
        title=title,
        names=tuple(names),
        points=tuple(points),
        baseline_trial=base,
        budgets=dict(budgets),
        groups=tuple(groups),
        layers=tuple(layers),
        decisions=tuple(decisions),
        front=tuple(front),
        failed=tuple(failed),
        latency_method=str(first.get("latency_method", "")),
        energy_method=str(first.get("energy_method", "")),
        device=str(study.user_attrs.get("device", "")),
        class_deltas=tuple(deltas),
        picked=picked,
        label_free=bool(study.user_attrs.get("label_free")),
        pair_fronts={n: tuple(pair_front(points, n)) for n in names if n != "accuracy"} if "accuracy" in names else {},
        sensitivity=sensitivity,
        surrogate=surrogate,
    )


def _sensitivity_of(study: optuna.Study, on_front: set[int]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The heatmap of the profile the study's solve used, and what the solve proposed."""
    from edgeslim.search._sensitivity import ATTR, SensitivityProfile

    stored = study.user_attrs.get("surrogate")
    if not stored:
        return None, None
    data = study.user_attrs.get(f"{ATTR}:{stored.get('space_key')}")
    heat = None
    if data:
        profile = SensitivityProfile.from_dict(data)
        rows, cols, z = profile.heatmap()
        heat = {"rows": rows, "cols": cols, "z": z, "seconds": round(profile.seconds, 2), "samples": profile.samples,
                "latency_source": profile.latency_source}
    proposed = sorted(t.number for t in study.get_trials(deepcopy=False)
                      if t.user_attrs.get("proposed_by") == "surrogate")
    return heat, {"weights": dict(stored.get("weights", {})), "spearman_fit": stored.get("spearman"),
                  "proposed": proposed, "front_proposed": sorted(set(proposed) & on_front)}




def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return html.escape(str(v))


def _front_table(data: ReportData) -> str:
    cols = ["trial", "preset", *data.names, "latency_p95_ms"]
    extra = ["accuracy_drop_pp", "max_class_drop_pp", "size_reduction", "latency_speedup"]
    refined = any(e.get("refined") for e in data.front)  # then the search's accuracy stands beside
    head = "".join(f"<th>{html.escape(c)}</th>" for c in
                   [*cols, *(["search accuracy"] if refined else []), *extra, "plan"])
    rows = []
    for e in data.front:
        vs = e.get("vs_baseline", {})
        cells = [_fmt(e.get(c, "")) for c in cols]
        if refined:
            cells.append(_fmt(e.get("search", {}).get("accuracy", "")))
        cells += [_fmt(vs.get(c, "")) for c in extra]
        cells.append(_fmt(e.get("plan_summary", "")))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _hover(p: dict[str, Any]) -> str:
    head = f"trial {p['trial']}" + (f" ({p['preset']})" if p["preset"] else "")
    return f"{head}<br>{html.escape(p['summary'])}" if p.get("summary") else head


def render_report(data: ReportData, path: Path) -> Path:
    """Draw ``data`` with plotly into one self-contained HTML file (plotly.js embedded)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    others = [n for n in data.names if n != "accuracy"]
    figs: list[Any] = []
    if "accuracy" in data.names and others:
        fig = make_subplots(rows=1, cols=len(others), subplot_titles=[LABELS.get(n, n) for n in others])
        for i, n in enumerate(others, start=1):
            by_trial = {p["trial"]: p for p in data.points}
            stairs = [by_trial[t] for t in data.pair_fronts.get(n, ())]
            on_stairs = {p["trial"] for p in stairs}
            rest = [p for p in data.points if p["trial"] not in on_stairs]
            base = [p for p in data.points if p["trial"] == data.baseline_trial]
            presets = [p for p in data.points if p["preset"] and p["preset"] != "dense"]
            show = i == 1
            fig.add_trace(go.Scatter(x=[p[n] for p in rest], y=[p["accuracy"] for p in rest], mode="markers",
                                     marker={"color": "#bbbbbb"}, name="trials", showlegend=show,
                                     text=[_hover(p) for p in rest], hoverinfo="text+x+y"), 1, i)
            # the front of this pair over all trials: the best accuracy each cost buys
            fig.add_trace(go.Scatter(x=[p[n] for p in stairs], y=[p["accuracy"] for p in stairs],
                                     mode="lines+markers", line={"shape": "hv", "color": "#d62728"},
                                     marker={"color": "#d62728", "size": 9},
                                     name="front of accuracy vs this cost", showlegend=show,
                                     text=[_hover(p) for p in stairs], hoverinfo="text+x+y"), 1, i)
            fig.add_trace(go.Scatter(x=[p[n] for p in presets], y=[p["accuracy"] for p in presets],
                                     mode="markers", marker={"symbol": "diamond-open", "size": 11, "color": "#1f77b4"},
                                     name="uniform presets", showlegend=show,
                                     text=[_hover(p) for p in presets], hoverinfo="text+x+y"), 1, i)
            fig.add_trace(go.Scatter(x=[p[n] for p in base], y=[p["accuracy"] for p in base], mode="markers",
                                     marker={"symbol": "star", "size": 16, "color": "black"},
                                     name="dense baseline", showlegend=show), 1, i)
            picked = [p for p in data.points if p["trial"] == data.picked]
            if picked:
                fig.add_trace(go.Scatter(x=[p[n] for p in picked], y=[p["accuracy"] for p in picked], mode="markers",
                                         marker={"symbol": "circle-open", "size": 22, "color": "#2ca02c",
                                                 "line": {"width": 3}},
                                         name=f"picked (trial {data.picked})", showlegend=show), 1, i)
            for budget, bound in data.budgets.items():
                b = BUDGETS.get(budget)
                if b is None or b.from_baseline:
                    continue
                axis, scale = b.key, 1.0 / b.scale  # the axis shows the record's unit
                if axis == n:  # shade the side of the budget that meets it
                    fig.add_vrect(x0=0, x1=bound * scale, fillcolor="green", opacity=0.08, line_width=0,
                                  row=1, col=i)
                    fig.add_vline(x=bound * scale, line_dash="dash", line_color="green", row=1, col=i)
                elif axis == "accuracy":
                    fig.add_hrect(y0=bound, y1=1.0, fillcolor="green", opacity=0.08, line_width=0, row=1, col=i)
                    fig.add_hline(y=bound, line_dash="dash", line_color="green", row=1, col=i)
            fig.update_xaxes(title_text=LABELS.get(n, n), type="log" if n == "size_bytes" else "linear",
                             row=1, col=i)
        fig.update_yaxes(title_text="agreement with the dense model (label-free)" if data.label_free
                         else "accuracy", row=1, col=1)
        fig.update_layout(title="Accuracy against each cost: in red the best accuracy each cost buys over all trials "
                                "(the front of that pair); the front over all objectives is the table below",
                          height=450)
        figs.append(fig)
    if data.decisions:
        ylabels = [f"trial {d['trial']}" for d in data.decisions]
        for key, cols, title, scale in (("sparsity", data.groups, "Channel sparsity per pruning group", "Reds"),
                                        ("rank", data.layers, "Rank ratio per layer (1 = not factorized)", "Blues_r"),
                                        ("bits", data.layers, "Weight bits per layer", "Greens_r")):
            if not cols:
                continue
            z = [[d[key][c] for c in cols] for d in data.decisions]
            fig = go.Figure(go.Heatmap(z=z, x=list(cols), y=ylabels, colorscale=scale, text=z,
                                       texttemplate="%{text}", hoverongaps=False))
            fig.update_layout(title=f"{title}: Pareto variants", height=120 + 28 * len(ylabels))
            figs.append(fig)
    if data.class_deltas:
        z = [list(d) for _, d in data.class_deltas]
        fig = go.Figure(go.Heatmap(z=z, x=[f"class {i}" for i in range(len(z[0]))],
                                   y=[f"trial {t}" for t, _ in data.class_deltas], colorscale="RdBu", zmid=0,
                                   text=z, texttemplate="%{text}"))
        fig.update_layout(title="Per-class accuracy change vs the dense baseline (pp): Pareto variants",
                          height=120 + 28 * len(z))
        figs.append(fig)
    if data.sensitivity:
        sens = data.sensitivity
        fig = go.Figure(go.Heatmap(z=sens["z"], x=sens["cols"], y=sens["rows"], colorscale="Reds",
                                   text=sens["z"], texttemplate="%{text}", hoverongaps=False,
                                   colorbar={"title": "drop (pp)"}))
        fig.update_layout(title=f"Sensitivity: accuracy drop (pp) of each knob value applied alone, no fine-tune, on "
                                f"{sens['samples']} training samples ({sens['seconds']} s); blank: the forward broke",
                          height=160 + 22 * len(sens["rows"]), yaxis={"autorange": "reversed"})
        figs.append(fig)
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    sur = data.surrogate
    surrogate_note = "" if not sur else (
        f"<p>Sensitivity-seeded search: the solve proposed trials {html.escape(str(sur['proposed']))}; "
        f"{len(sur['front_proposed'])} of them are on the front. Surrogate weights per knob kind "
        f"{html.escape(str({k: round(v, 4) for k, v in sur['weights'].items()}))}.</p>")
    failed = "".join(f"<li>trial {n}: {html.escape(r)}</li>" for n, r in data.failed)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}} .note{{color:#555}}</style></head><body>
<h1>{html.escape(data.title)}</h1>
<p class="note">Device: {html.escape(data.device)}.<br>Latency: {html.escape(data.latency_method)}.<br>Energy: {html.escape(data.energy_method)}.
Energy values are <b>estimates</b>, not measurements.</p>
<p>{len(data.points)} completed trials, {len(data.front)} on the Pareto front, {len(data.failed)} failed.
Budgets: {html.escape(str(data.budgets) if data.budgets else "none")}.
{f"Picked: trial {data.picked}." if data.picked is not None else ""}</p>
{parts[0] if parts else ""}
<h2>Pareto front</h2>{_front_table(data)}
{surrogate_note}
{"".join(parts[1:])}
{f"<h2>Failed trials</h2><ul>{failed}</ul>" if failed else ""}
</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc)
    tmp.replace(path)
    return path
