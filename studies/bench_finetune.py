"""Which fine-tune keeps what a network learned: BatchNorm statistics re-estimated or frozen, with
and without distillation from the dense model, side by side in one run.

For each plan (dense, uniform int8, uniform 25 % and 50 % sparsity, 50 % + int8) and each setting,
the plan is realized and fine-tuned through the search's own pipeline (``CompressionObjective.score``),
then scored on the held-out split: accuracy and top-1 agreement with the dense model.

    python studies/bench_finetune.py                       # digits-resnet, the spec's 30 steps at lr 2e-3
    python studies/bench_finetune.py --steps 20 --lr 2e-4 --batch-size 16   # a pretrained network's short fine-tune
"""

from __future__ import annotations

import argparse
import time

import torch

from edgeslim.objectives import FinetuneConfig, predictions
from edgeslim.search import CompressionObjective, load_spec, load_workload

PLANS = {"dense": {}, "int8": {"bits": 8}, "25%": {"sparsity": 0.25}, "50%": {"sparsity": 0.5},
         "50%+int8": {"sparsity": 0.5, "bits": 8}}
SETTINGS = {"norm train": ("train", 0.0), "norm frozen": ("frozen", 0.0), "norm reestimate": ("reestimate", 0.0),
            "train + distill": ("train", 0.5), "reestimate + distill": ("reestimate", 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="studies/digits-resnet.toml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    work = load_workload(spec, spec.output_dir, print)
    dense_pred = predictions(work.model, work.data)
    print(f"{work.description}: base accuracy {work.base_accuracy:.4f}; {args.steps} steps at lr {args.lr:g}, "
          f"batch {args.batch_size}")
    print(f"{'plan':<10} " + " ".join(f"{s:>22}" for s in SETTINGS) + "   (accuracy / agreement with dense)")
    t0 = time.perf_counter()
    for plan_name, kw in PLANS.items():
        cells = []
        for norm, distill in SETTINGS.values():
            cfg = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, norm=norm, distill=distill)
            with CompressionObjective(work.model, work.example_input, work.data.train, work.data.val,
                                      objectives=["accuracy"], finetune=cfg, seed=spec.seed,
                                      rules=spec.space.rule_set()) as obj:
                plan = obj.space.uniform_plan(**kw)
                # the dense plan is never fine-tuned in a study; here it is, to show the drift
                cand = obj.score(plan, steps=args.steps) if kw else _dense_finetuned(obj, args.steps)
                agree = float((predictions(cand.model, work.data) == dense_pred).mean())
                cells.append(f"{cand.metrics['accuracy']:.4f} / {agree:.4f}")
        print(f"{plan_name:<10} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


def _dense_finetuned(obj: CompressionObjective, steps: int):
    from edgeslim.objectives import Candidate, evaluate_accuracy, finetune_

    torch.manual_seed(obj.seed)
    model = obj.space.realize(obj.model, obj.space.dense_plan())
    finetune_(model, obj.workload.data, obj.context.finetune, obj.seed, obj.context.teacher)
    acc, per_class = evaluate_accuracy(model, obj.workload.data)
    return Candidate(obj.space.dense_plan(), model, {"accuracy": acc, "per_class_accuracy": per_class})


if __name__ == "__main__":
    main()
