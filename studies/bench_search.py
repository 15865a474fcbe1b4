"""Benchmark: search quality — hypervolume of the measured front against trials spent, for the
random, TPE, NSGA-II and sensitivity-seeded searches, several seeds each, same protocol.

Usage: python studies/bench_search.py [--workloads digits-cnn,digits-resnet] [--seeds 3]
       [--budgets random=200,tpe=150,nsga2=150,sensitivity=50] [--device dev-vm-1t] [--out DIR]

Protocol. Every search starts like the CLI's: the dense model and the uniform presets first,
then its sampler (the sensitivity search solves its front after the presets). Objectives are
accuracy, size and latency; latency is *predicted* by a calibrated device profile (default
``dev-vm-1t``), so it is deterministic and the samplers are compared on the search, not on
timing noise. A plan's scores depend on the plan only (fine-tunes are seeded by the study
spec, not the sampler), so all runs of a workload share one cache of scored plans; the
figure of merit is trials spent, not wall time.

Hypervolume. Each completed trial becomes (accuracy drop vs dense in pp, size / dense size,
latency / dense latency), all minimized; the reference point is (10 pp, 1.05, 1.25): a
variant counts if it loses under 10 pp and is no more than 5 % larger and 25 % slower than
dense (the dense model alone then holds a small box, so no history starts at 0). Hypervolume
is divided by the reference box's volume (10 x 1.05 x 1.25), hence in [0, 1]. Optuna computes
it (``optuna.visualization.plot_hypervolume_history``).

Output: a table (mean and min-max over seeds at the budgets the targets name), the
surrogate's rank correlation with the measured drop, how many front plans the solve proposed,
and ``hypervolume.html`` (plotly: mean and spread against trials) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

REFERENCE = (10.0, 1.05, 1.25)


def _normalized_history(study: Any, names: list[str]) -> list[float]:
    """Hypervolume after each trial (trial order), objectives normalized against dense."""
    import optuna
    from optuna.trial import TrialState, create_trial

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    dense = next(t for t in done if t.user_attrs.get("preset") == "dense")
    ia, i_s, il = names.index("accuracy"), names.index("size_bytes"), names.index("latency_ms")
    norm = optuna.create_study(directions=["minimize"] * 3)
    for t in sorted(done, key=lambda t: t.number):
        v = t.values
        point = [max(0.0, 100.0 * (dense.values[ia] - v[ia])), v[i_s] / dense.values[i_s],
                 v[il] / dense.values[il]]
        norm.add_trial(create_trial(values=point, params={}, distributions={}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = optuna.visualization.plot_hypervolume_history(norm, list(REFERENCE))
    box = REFERENCE[0] * REFERENCE[1] * REFERENCE[2]
    return [float(y) / box for y in fig.data[0].y]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="digits-cnn,digits-resnet")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default="random=200,tpe=150,nsga2=150,sensitivity=50",
                        help="sampler=trials, comma-separated (presets included)")
    parser.add_argument("--device", default="dev-vm-1t", help="calibrated profile that predicts latency")
    parser.add_argument("--out", default="studies/bench-search", help="folder for hypervolume.html and raw JSON")
    args = parser.parse_args()
    budgets = {k: int(v) for k, v in (item.split("=") for item in args.budgets.split(","))}

    import optuna
    import onnxruntime
    import torch

    from edgeslim.objectives import Candidate
    from edgeslim.search import (DeviceSpec, demo_spec, load_profile, load_spec, load_workload, make_sampler,
                                 optimize_seeded, spec_device, spec_objective, surrogate_quality)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, optuna {optuna.__version__}; latency predicted by {args.device}")
    results: dict[str, dict[str, Any]] = {}
    for wl in args.workloads.split(","):
        spec = demo_spec() if wl == "digits-cnn" else load_spec(here / f"{wl}.toml")
        spec = spec.replace(objectives=["accuracy", "size_bytes", "latency_ms"],
                            device=DeviceSpec(name=args.device))
        workload = load_workload(spec, out / wl, log=lambda m: None)
        profile = spec_device(spec)
        objective = spec_objective(spec, workload, profile)
        names = objective.metric_names
        cache: dict[str, dict[str, Any]] = {}
        real_score = objective.score
        t_scored = [0.0]

        def score(plan: Any, **kw: Any) -> Any:
            if kw:
                return real_score(plan, **kw)
            key = plan.to_json()
            if key not in cache:
                t0 = time.perf_counter()
                c = real_score(plan)
                t_scored[0] += time.perf_counter() - t0
                cache[key] = {k: v for k, v in c.metrics.items()}
            c = Candidate(plan, None)  # type: ignore[arg-type]
            c.metrics.update(cache[key])
            return c

        objective.score = score  # type: ignore[method-assign]
        stored_profile: dict[str, Any] = {}
        sens_seconds = None
        runs: dict[str, list[list[float]]] = {}
        quality: list[dict[str, Any]] = []
        t_wl = time.perf_counter()
        for sampler in budgets:
            for seed in range(args.seeds):
                study = optuna.create_study(directions=objective.directions,
                                            sampler=make_sampler(sampler, seed))
                objective.enqueue_baselines(study)
                if sampler == "sensitivity":  # run as run_search runs it
                    for key, value in stored_profile.items():  # the profile does not depend on the seed
                        study.set_user_attr(key, value)
                    optimize_seeded(study, objective, budgets[sampler])
                    if not stored_profile:
                        stored_profile = {k: v for k, v in study.user_attrs.items() if k.startswith("sensitivity:")}
                        sens_seconds = load_profile(study, objective.space).seconds
                else:
                    study.optimize(objective, n_trials=budgets[sampler], catch=(Exception,))
                runs.setdefault(sampler, []).append(_normalized_history(study, names))
                if sampler == "sensitivity":
                    front = [t.number for t in study.best_trials]
                    q = surrogate_quality(study, objective.space, front)
                    if q:
                        quality.append(q)
                print(f"  {wl} {sampler} seed {seed}: {len(study.trials)} trials, hypervolume "
                      f"{runs[sampler][-1][-1]:.4f}; {len(cache)} distinct plans scored so far "
                      f"({t_scored[0]:.0f} s scoring, {time.perf_counter() - t_wl:.0f} s in all)", flush=True)
        results[wl] = {"runs": runs, "quality": quality, "sensitivity_seconds": sens_seconds,
                       "distinct_plans": len(cache), "scoring_seconds": t_scored[0]}
        objective.close()

    (out / "hypervolume.json").write_text(json.dumps(results, indent=1))
    _print_table(results, budgets)
    _plot(results, out / "hypervolume.html")
    print(f"figure: {out / 'hypervolume.html'}")


def _at(runs: list[list[float]], n: int) -> tuple[float, float, float]:
    vals = [r[min(n, len(r)) - 1] for r in runs]
    return sum(vals) / len(vals), min(vals), max(vals)


def _print_table(results: dict[str, dict[str, Any]], budgets: dict[str, int]) -> None:
    checkpoints = sorted({10, 20, 50, 100, 150, 200} & set(range(1, max(budgets.values()) + 1)))
    for wl, res in results.items():
        print(f"\n{wl}: hypervolume (fraction of the reference box), mean [min-max] over seeds")
        print("| sampler | " + " | ".join(f"{c} trials" for c in checkpoints) + " |")
        print("|---|" + "---|" * len(checkpoints))
        for sampler, runs in res["runs"].items():
            cells = [f"{m:.4f} [{lo:.4f}-{hi:.4f}]" if c <= budgets[sampler] else "" for c in checkpoints
                     for m, lo, hi in [_at(runs, c)]]
            print(f"| {sampler} | " + " | ".join(cells) + " |")
        runs = res["runs"]
        if "sensitivity" in runs:
            s20, s50 = _at(runs["sensitivity"], 20)[0], _at(runs["sensitivity"], 50)[0]
            if "random" in runs and budgets["sensitivity"] >= 20:
                r = _at(runs["random"], budgets["random"])[0]
                print(f"target: sensitivity at 20 ({s20:.4f}) >= random at {budgets['random']} ({r:.4f}): "
                      f"{'met' if s20 >= r else 'MISSED'}")
            if "tpe" in runs and budgets["sensitivity"] >= 50:
                t = _at(runs["tpe"], budgets["tpe"])[0]
                print(f"target: sensitivity at 50 ({s50:.4f}) >= TPE at {budgets['tpe']} ({t:.4f}): "
                      f"{'met' if s50 >= t else 'MISSED'}")
        for q in res["quality"]:
            print(f"surrogate: Spearman {q['spearman']} over {q['trials']} trials, "
                  f"{q['front_proposed']} of {q['front']} front plans proposed by the solve")
        print(f"sensitivity pass: {res['sensitivity_seconds']} s; {res['distinct_plans']} distinct plans scored in "
              f"{res['scoring_seconds']:.0f} s")


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(results), subplot_titles=list(results))
    colors = {"random": "#7f7f7f", "tpe": "#1f77b4", "nsga2": "#2ca02c", "sensitivity": "#d62728"}
    for col, (wl, res) in enumerate(results.items(), start=1):
        for sampler, runs in res["runs"].items():
            n = max(len(r) for r in runs)
            xs = list(range(1, n + 1))
            mean = [_at(runs, x)[0] for x in xs]
            lo = [_at(runs, x)[1] for x in xs]
            hi = [_at(runs, x)[2] for x in xs]
            c = colors.get(sampler, "black")
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", line={"width": 0},
                                     fillcolor=c, opacity=0.15, showlegend=False, hoverinfo="skip"), 1, col)
            fig.add_trace(go.Scatter(x=xs, y=mean, line={"color": c}, name=sampler, showlegend=col == 1), 1, col)
        fig.update_xaxes(title_text="trials", type="log", row=1, col=col)
        fig.update_yaxes(title_text="hypervolume (fraction of reference box)", row=1, col=col)
    fig.update_layout(title="Hypervolume of the measured front against trials spent (mean, band: min-max over seeds)")
    fig.write_html(path, include_plotlyjs=True)


if __name__ == "__main__":
    main()
