"""Scale-out benchmark: trials per hour with 1 and 2 workers on this machine (SQLite and
PostgreSQL), storage statements and seconds per trial, the storage's own capacity, and from those
a projection for 8-64 workers on one PostgreSQL server.

Usage: python studies/bench_workers.py [--trials 12] [--rounds 2] [--postgres URL] [--out DIR]

Each configuration runs `edgeslim search` on the demo spec (digits CNN, 120 fine-tune steps,
latency measured here, one timing at a time) on a fresh study, in rounds A B C D, D C B A so
that the VM's drift falls on every configuration alike. Throughput is trials over the span from
the first trial's start to the last trial's end (start-up and base-model loading excluded).
Storage cost is counted client side in every worker process (EDGESLIM_STORAGE_STATS: statements
and the seconds they take, heartbeats included). The capacity probe runs K processes of Optuna's
ask/tell with a no-op objective, the demo's 15 categorical knobs and 20 user attributes per trial
(our write volume), on the same storage: the most trials per second the storage serves with this
machine's 2 cores shared between clients and server (a lower bound for a dedicated server).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent


def _span_trials(url: str, name: str) -> tuple[int, float]:
    trials = [t for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
              if t.datetime_complete is not None]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return len(trials), (end - start).total_seconds()


def run_config(spec: Path, out: Path, url: str, jobs: int, trials: int) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    stats = out / f"stats-{name}.jsonl"
    env = {**os.environ, "EDGESLIM_STORAGE_STATS": str(stats)}
    cmd = [sys.executable, "-m", "edgeslim.search.cli", "search", str(spec), "--name", name, "--out", str(out),
           "--storage", url, "--trials", str(trials), "--jobs", str(jobs), "--format", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"edgeslim search failed ({run.returncode}):\n{run.stderr[-3000:]}")
    n, span = _span_trials(url, name)
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    return {"trials": n, "span_s": span, "per_hour": 3600 * n / span,
            "statements_per_trial": sum(r["statements"] for r in rows) / n,
            "storage_s_per_trial": sum(r["seconds"] for r in rows) / n, "processes": len(rows)}


PROBE = r"""
import json, os, sys, time, warnings
warnings.simplefilter("ignore")  # heartbeats outside Study.optimize: this loop is only a load generator
import optuna
from edgeslim.search import open_storage
url, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage = open_storage(url, 60)
study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
knobs = {f"layer{i}.{k}": optuna.distributions.CategoricalDistribution(c)
         for i in range(5) for k, c in (("sparsity", (0.0, 0.25, 0.5, 0.75)), ("rank", (0.25, 0.5, 1.0)),
                                        ("bits", (4, 8, 32)))}
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    t = study.ask(knobs)
    for a in range(20):
        t.set_user_attr(f"metric{a}", 0.5 * a)
    study.tell(t, [0.9, 1e5, 0.02, 0.1])
    n += 1
print(n)
"""


def probe_capacity(url: str, clients: int, seconds: float, out: Path) -> dict[str, float]:
    """Trials per second the storage serves to ``clients`` processes doing nothing but storage work."""
    sys.path.insert(0, str(HERE.parent))
    from edgeslim.search import open_storage

    name = f"probe-{uuid.uuid4().hex[:8]}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=name, storage=open_storage(url, 60), directions=["maximize"] + ["minimize"] * 3)
    stats = out / f"stats-{name}.jsonl"
    env = {**os.environ, "EDGESLIM_STORAGE_STATS": str(stats)}
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, url, name, str(seconds)], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(clients)]
    counts = [int(p.communicate()[0].strip() or 0) for p in procs]
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    n = sum(counts)
    return {"clients": clients, "trials_per_s": n / seconds, "statements_per_trial": sum(r["statements"] for r in rows) / n,
            "statements_per_s": sum(r["statements"] for r in rows) / seconds, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--postgres", default=os.environ.get("EDGESLIM_TEST_POSTGRES_URL", ""),
                    help="PostgreSQL URL (default $EDGESLIM_TEST_POSTGRES_URL); empty: SQLite only")
    ap.add_argument("--probe-seconds", type=float, default=15.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-workers-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "demo.json"
    sys.path.insert(0, str(HERE.parent))
    from edgeslim.search import demo_spec

    spec.write_text(json.dumps(demo_spec().to_dict()))
    storages = {"sqlite": f"sqlite:///{out / 'bench.db'}"}
    if args.postgres:
        storages["postgresql"] = args.postgres
    # train and cache the base model once, so that no configuration pays for it
    subprocess.run([sys.executable, "-m", "edgeslim.search.cli", "search", str(spec), "--name", "warm", "--out",
                    str(out), "--storage", storages["sqlite"], "--trials", "1"], check=True, capture_output=True)
    configs = [(s, j) for s in storages for j in (1, 2)]
    results: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    order = [c for r in range(args.rounds) for c in (configs if r % 2 == 0 else configs[::-1])]
    for i, (storage, jobs) in enumerate(order, 1):
        got = run_config(spec, out, storages[storage], jobs, args.trials)
        results[(storage, jobs)].append(got)
        print(f"[{i}/{len(order)}] {storage:<10} {jobs} worker(s): {got['per_hour']:7.0f} trials/h  "
              f"{got['statements_per_trial']:6.1f} statements/trial  {1e3 * got['storage_s_per_trial']:7.1f} ms "
              f"storage/trial", flush=True)
    print(f"\nmachine: {os.cpu_count()} cores; {args.trials} trials per run, {args.rounds} rounds, demo spec "
          "(digits CNN, 120 steps, latency measured locally)\n")
    print(f"{'storage':<11} {'workers':>7} {'trials/h':>9} {'x 1 worker':>10} {'stmts/trial':>11} "
          f"{'storage ms/trial':>16} {'s/trial':>8}")
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
    for (storage, jobs), m in med.items():
        base = med[(storage, 1)]["per_hour"]
        print(f"{storage:<11} {jobs:>7} {m['per_hour']:>9.0f} {m['per_hour'] / base:>10.2f} "
              f"{m['statements_per_trial']:>11.1f} {1e3 * m['storage_s_per_trial']:>16.1f} {3600 / m['per_hour']:>8.2f}")
    if "postgresql" not in storages:
        return
    print("\nPostgreSQL capacity probe (no-op objective, our per-trial write volume):")
    probes = [probe_capacity(storages["postgresql"], k, args.probe_seconds, out) for k in (1, 4, 8)]
    for p in probes:
        print(f"  {p['clients']} client(s): {p['trials_per_s']:.0f} trials/s, {p['statements_per_s']:.0f} statements/s, "
              f"{p['statements_per_trial']:.1f} statements/trial")
    one = med[("postgresql", 1)]
    # the server's capacity in statements per second, spent at a real trial's statement count
    cap = max(p["statements_per_s"] for p in probes) / one["statements_per_trial"]
    trial_s = 3600 / one["per_hour"]
    print(f"\nProjection (one PostgreSQL server serving >= {max(p['statements_per_s'] for p in probes):.0f} statements/s "
          f"here = {cap:.1f} of this workload's trials/s at {one['statements_per_trial']:.0f} statements each; a trial "
          f"takes {trial_s:.2f} s on one worker):")
    for n in (8, 16, 32, 64):
        demand = n / trial_s  # trials per second n workers ask the storage for
        util = demand / cap
        per_hour = 3600 * min(demand, cap)
        print(f"  {n:>2} workers: {demand:6.1f} trials/s asked = {100 * util:5.1f} % of the probed capacity -> "
              f"~{per_hour:,.0f} trials/h" + ("  (storage-bound)" if util >= 1 else ""))
    for minutes in (1, 10):
        print(f"  trials of {minutes} min (a real network's fine-tune): the storage keeps up with ~{cap * 60 * minutes:,.0f} "
              "workers; below that, trials/h grow linearly with workers")


if __name__ == "__main__":
    main()
