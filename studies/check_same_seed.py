"""Same seed, same study: record a short seeded search's plans and accuracies, or compare with a record.

A refactor of the search must change no number. This runs the demo spec with the objectives
that do not depend on timing (accuracy and size: latency is measured, so a sampler that sees
it proposes different plans run to run) and writes, per trial, its plan, accuracy and size.

    python studies/check_same_seed.py --record before.json     # on the old commit
    python studies/check_same_seed.py --compare before.json    # on the new one: exit 1 on any difference

Accuracies are compared exactly: the same machine, seed and code path give the same bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeslim.search import demo_spec, run_search


def record(trials: int, steps: int) -> list[dict[str, Any]]:
    """The seeded demo search's trials: number, preset, plan, accuracy, size."""
    with tempfile.TemporaryDirectory(prefix="edgeslim-same-seed-") as tmp:
        spec = demo_spec().replace(trials=trials, out_dir=tmp, objectives=["accuracy", "size_bytes"])
        spec = spec.replace(finetune=type(spec.finetune)(steps=steps, lr=spec.finetune.lr,
                                                         batch_size=spec.finetune.batch_size))
        result = run_search(spec)
        return [{"trial": t.number, "state": t.state.name, "preset": t.user_attrs.get("preset", ""),
                 "plan": t.user_attrs.get("plan"), "values": t.values}
                for t in result.study.get_trials(deepcopy=False)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the trials to this JSON file")
    group.add_argument("--compare", type=Path, help="compare the trials with this JSON file")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    rows = record(args.trials, args.steps)
    if args.record:
        args.record.write_text(json.dumps(rows, indent=1))
        print(f"recorded {len(rows)} trials to {args.record}")
        return 0
    old = json.loads(args.compare.read_text())
    diffs = [(a["trial"], a, b) for a, b in zip(old, rows) if a != json.loads(json.dumps(b))]
    if len(old) != len(rows):
        print(f"{len(old)} trials recorded, {len(rows)} now")
    for n, a, b in diffs:
        print(f"trial {n} differs:\n  before {a}\n  now    {b}")
    same = not diffs and len(old) == len(rows)
    print(f"{len(rows)} trials: " + ("identical plans, accuracies and sizes" if same else f"{len(diffs)} differ"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
