"""The compression space of one model: pruning groups, knobs, plans, and realizing a plan."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch_pruning as tp
from optuna.distributions import BaseDistribution
from torch import nn

from edgeslim.spaces._errors import InfeasiblePlanError, SpaceError
from edgeslim.spaces._inventory import COMPRESSIBLE_TYPES, LayerInfo, inventory
from edgeslim.spaces._knobs import SUPPORTED_BITS, BitsKnob, Knob, RankKnob, RuleSet, SparsityKnob
from edgeslim.spaces._lowrank import factorize, factorized_params, rank_for
from edgeslim.spaces._plan import LayerPlan, Plan
from edgeslim.spaces._quant import QuantizedLayer, _set_submodule, custom_forward, forward_is_plain

__all__ = ["CompressionSpace", "PruneGroup", "link_quantizers_", "pruned_count"]

log = logging.getLogger("edgeslim")


@dataclasses.dataclass(frozen=True)
class PruneGroup:
    """Layers whose output channels must be removed together (residual adds, depthwise chains).

    ``name`` is the first member in execution order; ``root`` is the layer torch-pruning
    grows the group from.

    Example:
        >>> PruneGroup("layer1.0.conv1", "layer1.0.conv1", ("layer1.0.conv1",), 64).members
        ('layer1.0.conv1',)
    """

    name: str
    root: str
    members: tuple[str, ...]
    channels: int


def pruned_count(channels: int, sparsity: float, multiple: int = 1) -> int:
    """Channels a group of ``channels`` loses at ``sparsity``; with ``multiple`` > 1 the kept
    count is rounded to the nearest multiple of it (at least one multiple), the channel block a
    CPU's conv kernels compute in: a group no larger than one block is not pruned at all, since
    the kernel pads it back to a full block anyway.

    Example:
        >>> pruned_count(64, 0.25), pruned_count(32, 0.25, 16), pruned_count(64, 0.25, 16), pruned_count(12, 0.5, 16)
        (16, 0, 16, 0)
    """
    n = int(sparsity * channels + 1e-9)
    if multiple <= 1 or n == 0:
        return n
    if channels <= multiple:
        return 0
    kept = max(multiple, int((channels - n) / multiple + 0.5) * multiple)
    return max(channels - kept, 0)


def _plain_after_all(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> set[str]:
    """Which of the named custom-forward layers act as their plain op on the input they meet in
    ``model`` (one forward pass with hooks; nothing runs when ``names`` is empty)."""
    if not names:
        return set()
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.setdefault(n, args[0].detach().clone())) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n for n in names if n in seen and forward_is_plain(model.get_submodule(n), seen[n])}


class CompressionSpace:
    """Everything the search may change on one model, for one example input.

    Build it with :meth:`build`; it never modifies the base model.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> space = CompressionSpace.build(m, torch.zeros(1, 1, 8, 8))
        >>> sorted(space.distributions())[:2]
        ['0.bits', '0.rank']
        >>> space.realize(m, space.dense_plan())(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """

    def __init__(self, layers: tuple[LayerInfo, ...], groups: tuple[PruneGroup, ...],
                 knobs: tuple[Knob, ...], example_input: torch.Tensor,
                 excluded: Mapping[str, str], channel_multiple: int = 1,
                 calibration: torch.Tensor | None = None) -> None:
        self.channel_multiple = channel_multiple
        self.calibration = calibration
        self._stats: tuple[nn.Module, dict[str, _LayerStats]] | None = None
        self.layers = layers
        self.groups = groups
        self.knobs = knobs
        self.example_input = example_input
        self.excluded = dict(excluded)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor, rules: RuleSet | None = None,
              channel_multiple: int = 1, calibration: torch.Tensor | None = None) -> CompressionSpace:
        """Inventory ``model``, find coupled pruning groups with torch-pruning, apply ``rules``.

        Layers that cannot be pruned safely are left out of the sparsity space with a warning
        naming them; they keep their rank and bits knobs. With ``channel_multiple`` > 1 pruned
        groups keep a multiple of that many channels (see :func:`pruned_count`), and sparsity
        choices that would keep the same count are merged into the smallest of them.
        ``calibration`` (a batch of real inputs, e.g. 64 training samples) makes pruning
        data-aware: channels are ranked by what their removal changes in the layers that read
        them, and the removed channels' mean contribution is kept in those layers' biases (see
        :meth:`realize`). Without it channels are ranked by weight magnitude (L1).
        Raises :class:`SpaceError` when nothing is left to search.
        """
        if calibration is not None and (calibration.dim() != example_input.dim()
                                        or calibration.shape[1:] != example_input.shape[1:]):
            raise SpaceError(f"calibration batch shape {tuple(calibration.shape)} does not match the example "
                             f"input {tuple(example_input.shape)} beyond the batch dimension; pass a batch of "
                             "inputs shaped like the example")
        rules = rules or RuleSet()
        layers = tuple(inventory(model, example_input))
        if not layers:
            raise SpaceError("the model has no Conv1d/Conv2d/Linear layer to compress; "
                             "edgeslim compresses models built from those layers")
        unknown = rules.unknown_exact([l.name for l in layers])
        if unknown:
            raise SpaceError(f"rules name layers the model does not have: {unknown}; "
                             f"known layers: {[l.name for l in layers][:20]}")
        by_name = {l.name: l for l in layers}
        excluded: dict[str, str] = {}
        groups = _find_groups(model, example_input, layers, excluded)

        knobs: list[Knob] = []
        for g in groups:
            member_rules = [rules.resolve(m) for m in g.members]
            if any(r.freeze for r in member_rules):
                continue
            choices = set(member_rules[0].sparsity or (0.0,))
            for r in member_rules[1:]:
                choices &= set(r.sparsity or (0.0,))
            if channel_multiple < 1:
                raise SpaceError(f"channel_multiple must be >= 1, got {channel_multiple!r}; use 1 for no rounding")
            choices = {c for c in choices if g.channels - pruned_count(g.channels, c, channel_multiple) >= 1}
            if channel_multiple > 1:
                by_count: dict[int, float] = {}
                for c in sorted(choices):
                    by_count.setdefault(pruned_count(g.channels, c, channel_multiple), c)
                choices = set(by_count.values())
            if choices - {0.0}:
                knobs.append(SparsityKnob(g.name, tuple(sorted(choices | {0.0}))))
        ranks_of = {l.name: _useful_ranks(l, rules.resolve(l.name).rank or (1.0,)) for l in layers
                    if not rules.resolve(l.name).freeze}
        custom = [n for n, r in ranks_of.items() if len(r) > 1 and custom_forward(model.get_submodule(n))]
        plain = _plain_after_all(model, example_input, custom)
        dropped: dict[str, list[str]] = {}
        for layer in layers:
            if layer.name not in ranks_of:  # frozen
                continue
            rule, ranks = rules.resolve(layer.name), ranks_of[layer.name]
            if layer.name in custom and layer.name not in plain:
                cls_name = type(model.get_submodule(layer.name)).__name__
                excluded[f"{layer.name} (rank)"] = (f"{cls_name} does more than a convolution or matmul in its forward "
                                                     "on the input it meets; two factor layers would drop that")
                dropped.setdefault(cls_name, []).append(layer.name)
                ranks = (1.0,)
            if len(ranks) > 1:
                knobs.append(RankKnob(layer.name, ranks))
            bits = tuple(rule.bits or (32,))
            if bits != (32,):
                knobs.append(BitsKnob(layer.name, bits))
        for cls_name, names in dropped.items():
            warnings.warn(f"low rank left out for {len(names)} layer(s) of class {cls_name} ({', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''}): its forward does more than the plain op there "
                          "(e.g. padding computed in forward), which two factor layers would drop; their sparsity "
                          "and bits knobs stay", stacklevel=2)
        space = cls(layers, groups, tuple(knobs), example_input, excluded, channel_multiple, calibration)
        if not space.distributions():
            raise SpaceError(
                "nothing to search: every layer is frozen or has a single allowed value; "
                "unfreeze some layers or widen their sparsity/rank/bits choices in the spec's [space] rules")
        del by_name
        return space

    # ---- optuna side --------------------------------------------------------------------
    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the knobs that have more than one choice."""
        return {k.param_name: k.to_distribution() for k in self.knobs if len(k.choices) > 1}

    def plan_from_params(self, params: Mapping[str, Any]) -> Plan:
        """The plan an Optuna trial's params describe (fixed knobs take their single value)."""
        groups: dict[str, float] = {}
        layers: dict[str, dict[str, Any]] = {}
        for k in self.knobs:
            value = params.get(k.param_name, k.choices[0])
            if isinstance(k, SparsityKnob):
                groups[k.target] = float(value)
            else:
                layers.setdefault(k.target, {})[k.suffix] = value
        return Plan.from_dicts(
            groups,
            {name: LayerPlan(rank=float(v.get("rank", 1.0)), bits=int(v.get("bits", 32)))
             for name, v in layers.items()},
        )

    def params_of(self, plan: Plan) -> dict[str, Any]:
        """Optuna params (searchable knobs only) that reproduce ``plan``; inverse of plan_from_params."""
        out: dict[str, Any] = {}
        for k in self.knobs:
            if len(k.choices) < 2:
                continue
            if isinstance(k, SparsityKnob):
                value: Any = plan.sparsity_of(k.target)
            elif isinstance(k, RankKnob):
                value = plan.layer(k.target).rank
            else:
                value = plan.layer(k.target).bits
            out[k.param_name] = _nearest(k.choices, value)
        return out

    def dense_plan(self) -> Plan:
        """No pruning, no factorization, fp32 everywhere."""
        return self.uniform_plan(sparsity=0.0, rank=1.0, bits=32)

    def uniform_plan(self, sparsity: float = 0.0, rank: float = 1.0, bits: int = 32) -> Plan:
        """The same setting on every layer, snapped to each knob's nearest allowed value."""
        params: dict[str, Any] = {}
        for k in self.knobs:
            target = {"sparsity": sparsity, "rank": rank, "bits": bits}[k.suffix]
            params[k.param_name] = _nearest(k.choices, target)
        return self.plan_from_params(params)

    # ---- feasibility and realization ----------------------------------------------------
    def check(self, plan: Plan) -> None:
        """Raise :class:`InfeasiblePlanError` naming the first bad entry of ``plan``."""
        groups = {g.name: g for g in self.groups}
        layers = {l.name: l for l in self.layers}
        for name, s in plan.groups:
            if name not in groups:
                raise InfeasiblePlanError(f"plan prunes unknown group {name!r}; "
                                          f"known groups: {sorted(groups)}")
            if not 0.0 <= s < 1.0:
                raise InfeasiblePlanError(f"sparsity of group {name!r} must be in [0, 1), got {s!r} "
                                          "(1.0 would remove every channel); lower it")
            g = groups[name]
            if g.channels - pruned_count(g.channels, s, self.channel_multiple) < 1:
                raise InfeasiblePlanError(
                    f"sparsity {s!r} prunes group {name!r} to zero of its {g.channels} channels; "
                    "lower its sparsity")
        for name, lp in plan.layers:
            if name not in layers:
                raise InfeasiblePlanError(f"plan names unknown layer {name!r}; "
                                          f"known layers: {sorted(layers)[:20]}")
            if not 0.0 < lp.rank <= 1.0:
                raise InfeasiblePlanError(f"rank ratio of {name!r} must be in (0, 1], got {lp.rank!r}; "
                                          "use 1.0 to disable factorization")
            if lp.rank < 1.0 and layers[name].groups != 1 and layers[name].kind != "linear":
                raise InfeasiblePlanError(f"layer {name!r} is a grouped convolution and cannot be "
                                          f"factorized (rank {lp.rank!r}); use rank 1.0")
            if lp.bits not in SUPPORTED_BITS:
                raise InfeasiblePlanError(f"bits of {name!r} must be one of {list(SUPPORTED_BITS)}, "
                                          f"got {lp.bits!r}")

    def realize(self, base: nn.Module, plan: Plan, reduce_range: bool = False) -> nn.Module:
        """A new module implementing ``plan`` on ``base``; ``base`` is never modified.

        Order: prune coupled channels (physically, with torch-pruning; with a calibration batch
        the channels that change the next layers' outputs least go first, and the next layers'
        biases absorb the removed channels' mean), factorize the pruned
        weights by truncated SVD, then wrap quantized layers with fake quantization (7-bit int8
        weight levels with ``reduce_range``, for runtimes that need them). The BatchNorm that
        follows a quantized conv moves into its wrapper and stays live: fine-tuning
        re-normalises with it (a pruned network folded before fine-tuning has nothing left to
        re-normalise with and collapses), the output quantizer sees the normalised tensor ONNX
        Runtime quantizes, and export folds it with its final statistics.
        """
        self.check(plan)
        model = copy.deepcopy(base).eval()
        if any(s > 0 for _, s in plan.groups):
            _prune_(model, self, plan, self._layer_stats(base))
        quantized = {name for name, lp in plan.layers if lp.bits < 32}
        norms = _detach_batchnorm_(model, quantized) if quantized else {}
        for name, lp in plan.layers:
            target: nn.Module = model.get_submodule(name)
            if lp.rank < 1.0:
                pair = factorize(target, lp.rank)
                if pair is None:
                    log.info("layer %s: rank %.2f after pruning is not smaller; kept unfactorized",
                             name, lp.rank)
                else:
                    _set_submodule(model, name, pair)
                    target = pair
            if lp.bits < 32:
                if isinstance(target, nn.Sequential):  # a low-rank pair: the norm follows its second half
                    for i, factor in enumerate(target):
                        bn = norms.get(name) if i == len(target) - 1 else None
                        target[i] = QuantizedLayer(factor, lp.bits, reduce_range=reduce_range, norm=bn)
                else:
                    _set_submodule(model, name, QuantizedLayer(target, lp.bits, reduce_range=reduce_range,
                                                               norm=norms.get(name)))
        if quantized:
            link_quantizers_(model)
        return model

    def _layer_stats(self, base: nn.Module) -> dict[str, _LayerStats] | None:
        # one forward pass of the calibration batch per base model, reused by every realize (taken
        # again before each pruned group it cost 134 s per EfficientNet-Lite0 plan on 2 cores and
        # changed uniform pruning's agreement on digits-resnet by 0.02; bringing every layer's
        # output mean back to dense after pruning lowered Lite0's single-group agreement from
        # 0.916 to 0.878 on average: see studies/BENCHMARKS.md)
        if self.calibration is None:
            return None
        if self._stats is None or self._stats[0] is not base:
            self._stats = (base, _record_layer_stats(base, self.calibration))
        return dict(self._stats[1])  # _prune_ replaces entries, never edits the cached tensors


_GRID_KEEPING = (nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)  # values stay on their int8 grid
_RELUS = (torch.relu, torch.relu_, torch.nn.functional.relu)


class _QuantLeafTracer(torch.fx.Tracer):
    # conv/linear subclasses from other packages (TF-"same" padding convs) stay one node, as
    # torch.nn's own layers do, so the BatchNorm or ReLU after them is found as their user
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantizedLayer, *COMPRESSIBLE_TYPES)) or super().is_leaf_module(m, qualname)


def link_quantizers_(model: nn.Module) -> int:
    """Quantize int8 activations where ONNX Runtime's int8 graph does; returns the links made.

    A quantized layer whose only consumer is a ReLU or ReLU6 quantizes after it (``relu_after``,
    ``relu_max``): the output grid then starts at zero and ends at most at the cap, the export
    drops the activation into the output quantization, and a ReLU6 network keeps 8-bit
    resolution on [0, 6] instead of spreading it over the conv's whole pre-activation range. A quantized
    layer whose input is another quantized layer's output (through that ReLU, max-pooling,
    flattening) takes the producer's output grid (``source``): one tensor, one scale, so ONNX
    Runtime chains QLinearConv -> QLinearConv with no float tensor in between. Untraceable
    models keep separate quantizers (correct, with a requantization between layers).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> m[0], m[2] = QuantizedLayer(m[0], 8), QuantizedLayer(m[2], 8)
        >>> link_quantizers_(m), m[0].relu_after, m[2].source is m[0]
        (1, True, True)
    """
    import torch.fx

    try:
        graph = _QuantLeafTracer().trace(model)
    except Exception:
        log.info("cannot trace the model to chain its int8 layers; each keeps its own quantizers")
        return 0
    modules = dict(model.named_modules())

    def module(n: object) -> nn.Module | None:
        return modules.get(n.target) if isinstance(n, torch.fx.Node) and n.op == "call_module" else None

    def relu_cap(n: torch.fx.Node) -> float | None:
        """The top of a ReLU-like clamp from zero at ``n`` (inf for ReLU, 6 for ReLU6), else None."""
        m = module(n)
        if isinstance(m, nn.ReLU) or (n.op == "call_function" and n.target in _RELUS) \
                or (n.op == "call_method" and n.target in ("relu", "relu_")):
            return math.inf
        if isinstance(m, nn.Hardtanh) and m.min_val == 0.0:  # nn.ReLU6 is a Hardtanh(0, 6)
            return float(m.max_val)
        if n.op == "call_function" and n.target is F.relu6:
            return 6.0
        return None

    def is_relu(n: torch.fx.Node) -> bool:
        return relu_cap(n) is not None

    def keeps_grid(n: torch.fx.Node) -> bool:
        return (isinstance(module(n), _GRID_KEEPING) or (n.op == "call_function" and n.target is torch.flatten)
                or (n.op == "call_method" and n.target in ("flatten", "view", "reshape")))

    quantized = [n for n in graph.nodes if isinstance(module(n), QuantizedLayer) and module(n).quantize_input]
    for n in quantized:
        user = n
        while len(user.users) == 1 and isinstance(module(next(iter(user.users))), nn.Identity):
            user = next(iter(user.users))
        cap = relu_cap(next(iter(user.users))) if len(user.users) == 1 else None
        module(n).relu_after, module(n).relu_max = cap is not None, cap if cap is not None else math.inf
    links = 0
    for n in quantized:
        up, through_relu = n.args[0] if n.args else None, False
        while isinstance(up, torch.fx.Node) and not isinstance(module(up), QuantizedLayer):
            if is_relu(up):
                through_relu = True
            elif not keeps_grid(up):
                break
            up = up.args[0] if up.args else None
        producer = module(up) if isinstance(up, torch.fx.Node) else None
        if isinstance(producer, QuantizedLayer) and producer.quantize_input and (producer.relu_after or not through_relu):
            module(n).source = producer
            links += 1
    return links


def _detach_batchnorm_(model: nn.Module, convs: set[str]) -> dict[str, nn.Module]:
    """Take out each BatchNorm that directly follows one of ``convs`` (its slot becomes
    Identity) and return them by conv name, for the conv's quantized wrapper to apply."""
    import torch.fx

    try:
        graph = _QuantLeafTracer().trace(model)
    except Exception:  # untraceable model: keep BatchNorm in place, fake quantization is then approximate
        log.info("cannot trace the model to find the BatchNorm after quantized convs; it stays in place")
        return {}
    modules = dict(model.named_modules())
    taken: dict[str, nn.Module] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in convs:
            continue
        conv = modules[node.target]
        users = list(node.users)
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or len(users) != 1 or users[0].op != "call_module":
            continue
        bn = modules[users[0].target]
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.num_features != conv.out_channels:
            continue
        taken[node.target] = bn
        _set_submodule(model, users[0].target, nn.Identity())
    return taken


def _nearest(choices: tuple[float | int, ...], value: float | int) -> float | int:
    return min(choices, key=lambda c: (abs(c - value), c))


def _useful_ranks(layer: LayerInfo, ratios: tuple[float, ...]) -> tuple[float, ...]:
    if layer.kind != "linear" and layer.groups != 1:
        return (1.0,)
    k = 1 if layer.kind == "linear" else int(torch.tensor(layer.kernel_size).prod())
    dense = layer.out_channels * layer.in_channels * k
    useful = {r for r in ratios if r < 1.0
              and factorized_params(layer.out_channels, layer.in_channels, k,
                                    rank_for(layer.full_rank, r)) < dense}
    return tuple(sorted(useful | {1.0}))


def _output_layer(layers: tuple[LayerInfo, ...]) -> str:
    return max(layers, key=lambda l: l.order).name


def _find_groups(model: nn.Module, example: torch.Tensor, layers: tuple[LayerInfo, ...],
                 excluded: dict[str, str]) -> tuple[PruneGroup, ...]:
    work = copy.deepcopy(model).eval()
    names = {m: n for n, m in work.named_modules()}
    order = {l.name: l.order for l in layers}
    out_layer = _output_layer(layers)
    excluded[out_layer] = "output layer: its output channels are the model's outputs"
    try:
        dg = tp.DependencyGraph().build_dependency(
            work, example_inputs=example, verbose=False)
        raw = list(dg.get_all_groups(ignored_layers=[work.get_submodule(out_layer)],
                                     root_module_types=list(COMPRESSIBLE_TYPES)))
    except Exception as e:  # torch-pruning cannot trace some models; the rest of the space stays
        warnings.warn(f"torch-pruning could not trace the model ({e!r}); channel pruning is off "
                      "for every layer, rank and bits are still searched", stacklevel=3)
        for l in layers:
            excluded.setdefault(l.name, "torch-pruning could not trace the model")
        return ()
    groups: list[PruneGroup] = []
    for g in raw:
        members = sorted({names[it.dep.target.module] for it in g
                          if isinstance(it.dep.target.module, COMPRESSIBLE_TYPES)
                          and "out_channels" in getattr(it.dep.handler, "__name__", "")
                          and names.get(it.dep.target.module) in order},
                         key=order.__getitem__)
        if not members or out_layer in members:
            continue
        root = names[g[0].dep.target.module]
        channels = len(g[0].idxs)
        if channels < 2:
            continue
        groups.append(PruneGroup(members[0], root, tuple(members), channels))
    groups = _drop_unsafe(model, example, groups, excluded)
    covered = {m for g in groups for m in g.members}
    missed = [l.name for l in layers if l.name not in covered and l.name not in excluded]
    for name in missed:
        excluded[name] = "torch-pruning's dependency graph offers no safe way to remove its output channels"
    if missed:
        warnings.warn(f"channel pruning left out for {missed}: torch-pruning's dependency graph "
                      "offers no safe way to remove their output channels; rank and bits still apply",
                      stacklevel=3)
    return tuple(sorted(groups, key=lambda g: order[g.name]))


def _shapes(output: Any) -> list[Any]:
    """The shapes of every tensor in a model's output (a tensor, tuple, list or dict), in order."""
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, Mapping):
        return [(k, _shapes(v)) for k, v in output.items()]
    if isinstance(output, (tuple, list)):
        return [_shapes(v) for v in output]
    return [type(output).__name__]


def _drop_unsafe(model: nn.Module, example: torch.Tensor, groups: list[PruneGroup],
                 excluded: dict[str, str]) -> list[PruneGroup]:
    """Prune one channel of every group on a copy; drop groups whose pruning breaks the model."""
    def works(subset: list[PruneGroup]) -> bool:
        space = CompressionSpace((), tuple(subset), (), example, {})
        plan = Plan.from_dicts({g.name: 1.0 / g.channels for g in subset}, {})
        try:
            m = copy.deepcopy(model).eval()
            _prune_(m, space, plan)
            with torch.no_grad():
                return _shapes(m(example)) == _shapes(model.eval()(example))
        except Exception:
            return False

    if not groups or works(groups):
        return groups
    kept = []
    for g in groups:
        if works([g]):
            kept.append(g)
        else:
            for m in g.members:
                excluded[m] = "pruning its channels breaks the forward pass"
            warnings.warn(f"channel pruning left out for {list(g.members)}: removing their channels "
                          "breaks the forward pass", stacklevel=4)
    return kept


@dataclasses.dataclass(frozen=True)
class _LayerStats:
    """A conv/linear layer over a calibration batch: the mean input (per channel and
    position for convs, per feature for linears), each channel's mean square, and the variance
    of each of its output channels."""

    mean: torch.Tensor  # (C, *spatial) for convs, (F,) for linears
    square: torch.Tensor  # (C,) or (F,)
    out_variance: torch.Tensor  # (O,)

    def variance(self) -> torch.Tensor:
        m = self.mean.reshape(self.mean.shape[0], -1).mean(1)
        return (self.square - m * m).clamp_min(0.0)

    def without(self, idxs: list[int]) -> _LayerStats:
        keep = torch.ones(self.mean.shape[0], dtype=torch.bool)
        keep[idxs] = False
        return _LayerStats(self.mean[keep], self.square[keep], self.out_variance)

    def without_outputs(self, idxs: list[int]) -> _LayerStats:
        keep = torch.ones(self.out_variance.shape[0], dtype=torch.bool)
        keep[idxs] = False
        return _LayerStats(self.mean, self.square, self.out_variance[keep])


def _record_layer_stats(model: nn.Module, inputs: torch.Tensor, batch: int = 16) -> dict[str, _LayerStats]:
    """Input and output statistics of every conv/linear layer of ``model`` over ``inputs`` (eval mode)."""
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def channels_last(t: torch.Tensor, linear: bool) -> torch.Tensor:  # (samples, channels)
        t = t.detach().float()
        return t.reshape(-1, t.shape[-1]) if linear else t.transpose(0, 1).reshape(t.shape[1], -1).T

    def hook(name: str, linear: bool) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            xs, y = channels_last(args[0], linear), channels_last(out, linear)
            # a linear's samples are its rows; a conv's are its batch items (positions averaged)
            n = len(xs) if linear else args[0].shape[0]
            mean = xs.sum(0) if linear else args[0].detach().float().sum(0)  # a conv's per position

            def per_sample(t: torch.Tensor) -> torch.Tensor:
                return t.sum(0) * n / len(t)

            parts = [mean, per_sample(xs * xs), per_sample(y), per_sample(y * y)]
            if name in sums:
                for acc, part in zip(sums[name], parts):
                    acc += part
            else:
                sums[name] = parts
            counts[name] = counts.get(name, 0) + n
        return record

    handles = [m.register_forward_hook(hook(n, isinstance(m, nn.Linear)))
               for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE_TYPES)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(inputs), batch):
                model(inputs[start:start + batch])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = {}
    for n, (m, sq, ym, ysq) in sums.items():
        ym, ysq = ym / counts[n], ysq / counts[n]
        stats[n] = _LayerStats(m / counts[n], sq / counts[n], (ysq - ym * ym).clamp_min(0.0))
    return stats


def _reads_channels(item: Any) -> bool:
    """Whether a pruning-group item removes input channels of a layer that sums over them."""
    m = item.dep.target.module
    if "in_channels" not in getattr(item.dep.handler, "__name__", ""):
        return False
    return isinstance(m, nn.Linear) or (isinstance(m, COMPRESSIBLE_TYPES) and getattr(m, "groups", 1) == 1)


def _reader(item: Any, stats: Mapping[str, _LayerStats], names: Mapping[nn.Module, str]
            ) -> tuple[nn.Module, str, _LayerStats] | None:
    """The layer a group item removes input channels of, its name and statistics (None when the
    item is not such a reader, or its statistics no longer line up with its weight)."""
    if not _reads_channels(item):
        return None
    m = item.dep.target.module
    name = names.get(m, "")
    st = stats.get(name)
    if st is None or st.mean.shape[0] != m.weight.shape[1]:
        return None
    return m, name, st


def _output_importance(group: Any, stats: Mapping[str, _LayerStats], names: Mapping[nn.Module, str],
                       channels: int) -> torch.Tensor | None:
    """Per channel of ``group``: the variance its removal adds to the outputs of the layers that
    read it, once its mean is compensated (input variance x squared weights), relative to each
    output channel's own variance (what a BatchNorm after it divides by), summed."""
    score = torch.zeros(channels)
    found = False
    for item in group:
        reader = _reader(item, stats, names)
        if reader is None:
            continue
        m, _, st = reader
        w = m.weight.detach().float()
        w2 = (w * w).reshape(w.shape[0], w.shape[1], -1).sum(2)  # (out, in)
        if st.out_variance.shape[0] == w.shape[0]:
            w2 = w2 / (st.out_variance[:, None] + 1e-8)
        contribution = st.variance() * w2.sum(0)
        idxs, roots = torch.as_tensor(item.idxs), torch.as_tensor(item.root_idxs)
        score.index_add_(0, roots, contribution[idxs])
        found = True
    return score if found else None


def _compensate_(group: Any, stats: dict[str, _LayerStats], names: Mapping[nn.Module, str]) -> None:
    """Move the removed channels' mean contribution into the biases of the layers reading them,
    then forget those channels in the statistics (indices shift once the group is pruned)."""
    for item in group:
        name = names.get(item.dep.target.module, "")
        st = stats.get(name)  # statistics exist for conv/linear layers only: each has a weight
        if (st is not None and "out_channels" in getattr(item.dep.handler, "__name__", "")
                and st.out_variance.shape[0] == item.dep.target.module.weight.shape[0]):
            stats[name] = st.without_outputs(list(item.idxs))
            continue
        reader = _reader(item, stats, names)
        if reader is None:
            continue
        m, name, st = reader
        removed = torch.zeros_like(st.mean)
        removed[item.idxs] = st.mean[item.idxs]
        with torch.no_grad():
            # the layer is linear in its input: f(x) - f(0) is its weight applied to x, with the
            # layer's own padding, stride and groups (a conv's edge positions see fewer taps)
            shift = m(removed.unsqueeze(0)) - m(torch.zeros_like(removed).unsqueeze(0))
            shift = shift.reshape(shift.shape[0], shift.shape[1], -1).mean((0, 2)) if shift.dim() > 2 else shift[0]
            if m.bias is None:
                m.bias = nn.Parameter(shift.to(m.weight.dtype))
            else:
                m.bias.add_(shift.to(m.bias.dtype))
        stats[name] = st.without(list(item.idxs))


def _prune_(model: nn.Module, space: CompressionSpace, plan: Plan,
            stats: dict[str, _LayerStats] | None = None) -> None:
    """Remove channels in place with torch-pruning's dependency graph.

    With ``stats`` (the dense network's, see :func:`_record_layer_stats`) the channels whose
    removal changes the reading layers' outputs least go first and their mean is compensated in
    those layers' biases; without, the lowest L1 weight norm goes first.
    """
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=space.example_input, verbose=False)
    importance = tp.importance.GroupMagnitudeImportance(p=1)
    names = {m: n for n, m in model.named_modules()}
    for g in space.groups:
        s = plan.sparsity_of(g.name)
        n = pruned_count(g.channels, s, space.channel_multiple)
        if n == 0:
            continue
        root = model.get_submodule(g.root)
        fn = dg.get_pruner_of_module(root).prune_out_channels
        full = dg.get_pruning_group(root, fn, list(range(g.channels)))
        scores = _output_importance(full, stats, names, g.channels) if stats is not None else None
        if scores is None:
            scores = importance(full)
        idxs = torch.argsort(scores)[:n].tolist()
        group = dg.get_pruning_group(root, fn, idxs)
        if stats is not None:
            _compensate_(group, stats, names)
        group.prune()
