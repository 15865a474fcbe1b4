"""Names the CLI, the spec and the library share: built-in workloads and samplers.

Plain data, no imports: the CLI reads it to build ``--help`` without loading torch.
"""

from __future__ import annotations

__all__ = ["BUILTIN_WORKLOADS", "SAMPLERS"]

# name -> (input channels, input size, default training epochs); the model classes are in _workloads.
# 0 epochs: pretrained weights that ship in a package, scored label-free on bundled photos (_pretrained)
BUILTIN_WORKLOADS: dict[str, tuple[int, int, int]] = {
    "digits-cnn": (1, 8, 40), "digits-resnet": (1, 32, 6), "efficientnet-lite0": (3, 160, 0)}

# name -> what it is; make_sampler builds them (seeded)
SAMPLERS: dict[str, str] = {
    "tpe": "Optuna's TPE, multivariate, 10 random start-up trials (default)",
    "nsga2": "Optuna's NSGA-II, population 20",
    "random": "uniform random sampling",
    "sensitivity": ("TPE seeded after the presets with a solved front: per-knob sensitivity (no fine-tune), "
                    "a surrogate fitted on the presets, scipy MILP over a latency x size budget grid"),
}
