"""Study specs: a TOML file (or the embedded demo) parsed into frozen, type-checked sections."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeslim.search._registry import BUILTIN_WORKLOADS, SAMPLERS
from edgeslim.spaces import LayerRule, RuleSet, SpaceError, SpecError

__all__ = [
    "BudgetsSpec", "DataSpec", "DeviceSpec", "FinetuneSpec", "ModelSpec", "RefineSpec", "RuleSpec", "SpaceSpec",
    "StudySpec",
    "load_spec", "parse_spec", "demo_spec", "spec_from_dict",
]




@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to compress: a built-in workload, ``module:factory`` or a torchvision name.

    ``factory`` imports and runs user code. ``checkpoint`` is loaded with
    ``torch.load(weights_only=True)``. ``input_shape`` excludes the batch dimension.

    Example:
        >>> ModelSpec(builtin="digits-cnn").builtin
        'digits-cnn'
    """

    builtin: str = ""
    factory: str = ""
    torchvision: str = ""
    checkpoint: str = ""
    input_shape: list[int] = dataclasses.field(default_factory=list)
    num_classes: int = 0
    train_epochs: int = 0


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where data comes from: the built-in digits, an ImageFolder root or ``module:factory``.

    An ImageFolder root with ``train/`` and ``val/`` folders uses them; otherwise
    ``val_fraction`` of it is held out (stratified, seeded).

    Example:
        >>> DataSpec(image_folder="data/flowers").val_fraction
        0.3
    """

    builtin: str = ""
    image_folder: str = ""
    factory: str = ""
    val_fraction: float = 0.3


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Target device. ``local`` measures on this machine with ``threads`` intra-op threads.

    Example:
        >>> DeviceSpec().name
        'local'
    """

    name: str = "local"
    threads: int = 1


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """Short fine-tune of every candidate (AdamW, cosine decay).

    ``norm = "frozen"`` keeps BatchNorm statistics as the model came (pretrained networks);
    ``distill`` in [0, 1] weighs distillation from the dense model; ``dropout = false`` keeps
    dropout and drop-connect off while fine-tuning (see ``FinetuneConfig``).

    Example:
        >>> FinetuneSpec().steps, FinetuneSpec().norm
        (150, 'train')
    """

    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 64
    score: str = "torch"  # "artifact": accuracy of the exported ONNX file through ONNX Runtime
    norm: str = "train"
    dropout: bool = True
    distill: float = 0.0
    temperature: float = 2.0
    device: str = "auto"  # where fine-tunes run: "auto" (CUDA when present), "cpu" or "cuda"


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """One per-layer rule as written in TOML (lists become tuples in :class:`LayerRule`)."""

    sparsity: list[float] | None = None
    rank: list[float] | None = None
    bits: list[int] | None = None
    freeze: bool = False

    def to_rule(self) -> LayerRule:
        """The validated :class:`LayerRule`."""
        return LayerRule(
            sparsity=tuple(self.sparsity) if self.sparsity is not None else None,
            rank=tuple(self.rank) if self.rank is not None else None,
            bits=tuple(self.bits) if self.bits is not None else None,
            freeze=self.freeze,
        )


@dataclasses.dataclass(frozen=True)
class SpaceSpec:
    """Per-layer rules: ``{"_default" | "fqn" | "re:<regex>": RuleSpec}``.

    Example:
        >>> SpaceSpec(rules={"_default": RuleSpec(bits=[8, 32])}).rule_set().default.bits
        (8, 32)
    """

    rules: dict[str, RuleSpec] = dataclasses.field(default_factory=dict)
    # pruned groups keep a multiple of this many channels; 0: the target device's probed conv
    # channel block (16 on AVX-512, 8 on AVX2), 1: no rounding
    channel_multiple: int = 1
    # how pruned channels are chosen: "activation" (what removing them changes in the layers that
    # read them, over 64 training inputs, their mean kept in those layers' biases) or "magnitude"
    # (lowest L1 weight norm, no compensation; what studies from before the option did)
    pruning: str = "activation"

    def rule_set(self) -> RuleSet:
        """Resolved rules (exact FQN, then regex, then default)."""
        try:
            return RuleSet.from_mapping({k: v.to_rule() for k, v in self.rules.items()})
        except SpaceError as e:
            raise SpecError(f"[space.rules]: {e}") from None


@dataclasses.dataclass(frozen=True)
class BudgetsSpec:
    """SLO budgets recorded as Optuna constraints (feasible when every one holds).

    Example:
        >>> BudgetsSpec(max_latency_ms=1.0).active()
        {'max_latency_ms': 1.0}
    """

    max_latency_ms: float | None = None
    max_size_kb: float | None = None
    max_energy_mj: float | None = None
    min_accuracy: float | None = None

    def active(self) -> dict[str, float]:
        """The budgets that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class RefineSpec:
    """The refine stage (``edgeslim refine``): the front and the trials within ``margin_pp``
    accuracy of it are fine-tuned ``steps`` steps (default 10x the search's) at ``lr``
    (default the search's) and re-scored on their exported artifact.

    Example:
        >>> RefineSpec().margin_pp
        0.5
    """

    steps: int | None = None
    lr: float | None = None
    margin_pp: float = 0.5


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A whole study: what to compress, on which data and device, how long to search.

    ``storage`` is any Optuna storage URL; empty means a SQLite file in ``out_dir``.
    ``out_dir`` empty means ``studies/<name>``.

    Example:
        >>> s = demo_spec()
        >>> s.name, s.model.builtin, s.objectives[0]
        ('digits-demo', 'digits-cnn', 'accuracy')
    """

    name: str = "digits-demo"
    trials: int = 30
    seed: int = 0
    sampler: str = "tpe"
    storage: str = ""
    out_dir: str = ""
    # seconds between a running trial's heartbeats on RDB storage (SQLite, PostgreSQL): a trial silent
    # for twice this long is stale (its worker was killed); it is marked failed and its plan retried once
    heartbeat_s: int = 60
    objectives: list[str] = dataclasses.field(
        default_factory=lambda: ["accuracy", "size_bytes", "latency_ms", "energy_mj"])
    model: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec(builtin="digits-cnn"))
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    device: DeviceSpec = dataclasses.field(default_factory=DeviceSpec)
    finetune: FinetuneSpec = dataclasses.field(default_factory=FinetuneSpec)
    space: SpaceSpec = dataclasses.field(default_factory=SpaceSpec)
    budgets: BudgetsSpec = dataclasses.field(default_factory=BudgetsSpec)
    refine: RefineSpec = dataclasses.field(default_factory=RefineSpec)

    def __post_init__(self) -> None:
        _check_values(self)

    @property
    def output_dir(self) -> Path:
        """Folder for study.db, base model, pareto.json/csv and report.html."""
        return Path(self.out_dir) if self.out_dir else Path("studies") / self.name

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL (default: SQLite in the output folder)."""
        return self.storage or f"sqlite:///{(self.output_dir / 'study.db').as_posix()}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored on the Optuna study)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> StudySpec:
        """A copy with top-level fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)


def _check_values(spec: StudySpec) -> None:
    from edgeslim.objectives import OBJECTIVES

    if spec.trials < 1:
        raise SpecError(f"trials must be >= 1, got {spec.trials!r}")
    if spec.heartbeat_s < 1:
        raise SpecError(f"[study] heartbeat_s must be >= 1, got {spec.heartbeat_s!r}; 60 suits trials of any length")
    if spec.finetune.score not in ("torch", "artifact"):
        raise SpecError(f"[finetune] score must be 'torch' or 'artifact', got {spec.finetune.score!r}")
    if spec.sampler not in SAMPLERS:
        raise SpecError(f"unknown sampler {spec.sampler!r}; choose one of {list(SAMPLERS)}")
    if not spec.name or "/" in spec.name or spec.name.startswith("."):
        raise SpecError(f"study name {spec.name!r} must be a plain folder name (no '/', not hidden)")
    unknown = [o for o in spec.objectives if o not in OBJECTIVES]
    if unknown or not spec.objectives:
        raise SpecError(f"unknown objectives {unknown or spec.objectives!r}; "
                        f"choose from {sorted(OBJECTIVES)}")
    for name in spec.objectives:
        for need in OBJECTIVES[name].requires:
            if need not in spec.objectives:
                raise SpecError(f"objective {name!r} needs {need!r}; add it to objectives")
    m = spec.model
    chosen = [k for k in ("builtin", "factory", "torchvision") if getattr(m, k)]
    if len(chosen) != 1:
        raise SpecError(f"[model] needs exactly one of builtin, factory, torchvision; got {chosen or 'none'}")
    if m.builtin and m.builtin not in BUILTIN_WORKLOADS:
        raise SpecError(f"unknown built-in model {m.builtin!r}; built-ins: {list(BUILTIN_WORKLOADS)}; "
                        "or give factory = 'module:function' or torchvision = '<name>'")
    if m.factory and ":" not in m.factory:
        raise SpecError(f"[model] factory must look like 'module:function', got {m.factory!r}")
    if m.builtin and m.checkpoint:
        raise SpecError(f"[model] checkpoint {m.checkpoint!r} next to builtin = {m.builtin!r}: a built-in model "
                        "trains (or ships) its own weights; drop checkpoint, or load your weights with "
                        "torchvision = '<name>' or factory = 'module:function'")
    if m.builtin and (spec.data.image_folder or spec.data.factory):
        source = f"image_folder = {spec.data.image_folder!r}" if spec.data.image_folder else \
            f"factory = {spec.data.factory!r}"
        raise SpecError(f"[data] {source} next to [model] builtin = {m.builtin!r}: a built-in model comes with "
                        "its own data; drop the [data] source, or bring your model with torchvision or factory")
    if spec.data.image_folder and len(m.input_shape) < 2:
        raise SpecError("[model] input_shape (without batch, e.g. [3, 32, 32]) is required with "
                        "[data] image_folder: images are resized to it")
    d = spec.data
    sources = [k for k in ("builtin", "image_folder", "factory") if getattr(d, k)]
    if len(sources) > 1:
        raise SpecError(f"[data] takes one of builtin, image_folder, factory; got {sources}")
    if not sources and not m.builtin:
        raise SpecError("[data] needs image_folder = 'path' or factory = 'module:function' "
                        "for a non-built-in model")
    if d.builtin and d.builtin != "digits":
        raise SpecError(f"unknown built-in data {d.builtin!r}; the built-in data set is 'digits'")
    if d.factory and ":" not in d.factory:
        raise SpecError(f"[data] factory must look like 'module:function', got {d.factory!r}")
    if not 0.0 < d.val_fraction < 1.0:
        raise SpecError(f"[data] val_fraction must be in (0, 1), got {d.val_fraction!r}")
    if spec.device.threads < 1:
        raise SpecError(f"[device] threads must be >= 1, got {spec.device.threads!r}")
    if spec.finetune.steps < 0 or spec.finetune.lr <= 0 or spec.finetune.batch_size < 1:
        raise SpecError(f"[finetune] needs steps >= 0, lr > 0, batch_size >= 1; got {spec.finetune}")
    if spec.finetune.device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"[finetune] device must be 'auto' (CUDA when present), 'cpu' or 'cuda'; "
                        f"got {spec.finetune.device!r}")
    if spec.finetune.norm not in ("train", "frozen", "reestimate"):
        raise SpecError(f"[finetune] norm must be 'train' (BatchNorm statistics follow the fine-tune's batches), "
                        f"'frozen' (keep them) or 'reestimate' (re-estimate on 1024 samples, then keep them), "
                        f"got {spec.finetune.norm!r}")
    if not 0.0 <= spec.finetune.distill <= 1.0 or spec.finetune.temperature <= 0:
        raise SpecError(f"[finetune] distill must be in [0, 1] (0: labels only, 1: teacher only) and temperature "
                        f"> 0; got distill {spec.finetune.distill!r}, temperature {spec.finetune.temperature!r}")
    r = spec.refine
    if r.steps is not None and r.steps < 1:
        raise SpecError(f"[refine] steps must be >= 1, got {r.steps!r}; leave it out for 10x the search's steps")
    if r.lr is not None and r.lr <= 0:
        raise SpecError(f"[refine] lr must be > 0, got {r.lr!r}; leave it out for the search's lr")
    if r.margin_pp < 0:
        raise SpecError(f"[refine] margin_pp must be >= 0, got {r.margin_pp!r}; 0 refines the front only")
    if spec.space.channel_multiple < 0:
        raise SpecError(f"[space] channel_multiple must be >= 0, got {spec.space.channel_multiple!r}; "
                        "0 rounds to the device's channel block, 1 does not round")
    from edgeslim.search._objective import PRUNING_CRITERIA

    if spec.space.pruning not in PRUNING_CRITERIA:
        raise SpecError(f"[space] pruning must be one of {list(PRUNING_CRITERIA)}, got {spec.space.pruning!r}; "
                        "'activation' is the default")
    spec.space.rule_set()
    from edgeslim.search._budgets import check_budgets

    try:
        check_budgets(spec.budgets.active())
    except SpecError as e:
        raise SpecError(f"[budgets]: {e}") from None


# ---- TOML -> dataclasses, with key and type checks --------------------------------------------
_SECTIONS = {"model", "data", "device", "finetune", "space", "budgets", "refine"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be a table, got {type(value).__name__}")
        return _from_table(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SpecError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be a table, got {value!r}")
        return {str(k): _convert(v, item, f"{where}.{k!r}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise SpecError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _from_table(cls: type, table: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise SpecError(f"unknown key {where + '.' if where else ''}{unknown[0]}; "
                        f"expected one of {sorted(fields)}")
    kwargs = {k: _convert(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in table.items()}
    return cls(**kwargs)


def parse_spec(data: Mapping[str, Any]) -> StudySpec:
    """Build a spec from a parsed TOML document. Top level: ``[study]`` plus the sections.

    Example:
        >>> parse_spec({"study": {"name": "x", "trials": 3}}).trials
        3
        >>> parse_spec({"study": {"trials": "3"}})
        Traceback (most recent call last):
        ...
        edgeslim.spaces._errors.SpecError: study.trials must be int, got str '3'
    """
    allowed = _SECTIONS | {"study"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"unknown section [{unknown[0]}]; expected one of {sorted(allowed)}")
    top = dict(data.get("study", {}))
    if not isinstance(data.get("study", {}), Mapping):
        raise SpecError("[study] must be a table")
    bad = sorted(set(top) & _SECTIONS)
    if bad:
        raise SpecError(f"study.{bad[0]} must be its own [{bad[0]}] section")
    for section in _SECTIONS:
        if section in data:
            top[section] = data[section]
    return _from_table(StudySpec, top, "study")


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML study spec (or a ``.json`` one in :meth:`StudySpec.to_dict`'s form).

    Example:
        >>> load_spec("studies/digits-demo.toml").name  # doctest: +SKIP
        'digits-demo'
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"study spec {str(p)!r} does not exist; pass the path of a .toml file "
                        "(see studies/digits-demo.toml)")
    if p.suffix == ".json":  # a spec as a study stores it (StudySpec.to_dict): what `--jobs` hands its workers
        try:
            flat = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"malformed JSON in {str(p)!r}: {e}; fix the file and run again") from None
        if not isinstance(flat, dict):
            raise SpecError(f"{str(p)!r} must hold a JSON object (a spec as StudySpec.to_dict writes it)")
        return spec_from_dict(flat)
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"malformed TOML in {str(p)!r}: {e}; fix the file and run again") from None
    return parse_spec(data)


def spec_from_dict(flat: Mapping[str, Any]) -> StudySpec:
    """The spec :meth:`StudySpec.to_dict` wrote (as a study stores it), validated again.

    Example:
        >>> spec_from_dict(demo_spec().to_dict()) == demo_spec()
        True
    """
    return parse_spec({"study": {k: v for k, v in flat.items() if k not in _SECTIONS},
                       **{k: v for k, v in flat.items() if k in _SECTIONS}})


def demo_spec() -> StudySpec:
    """The embedded demo: a small CNN on scikit-learn's digits, a few dozen trials.

    The first and last layer are kept at 8 bits or more, a common rule for small nets.
    """
    return StudySpec(
        name="digits-demo", trials=30, seed=0, sampler="tpe",
        model=ModelSpec(builtin="digits-cnn"),
        finetune=FinetuneSpec(steps=120, lr=2e-3, batch_size=64),
        space=SpaceSpec(rules={
            "_default": RuleSpec(sparsity=[0.0, 0.25, 0.5, 0.75], rank=[0.25, 0.5, 1.0], bits=[4, 8, 32]),
            "features.0": RuleSpec(sparsity=[0.0, 0.25], bits=[8, 32]),
            "classifier.3": RuleSpec(bits=[8, 32]),
        }),
    )


def spec_fingerprint(spec: StudySpec) -> str:
    """JSON of the parts that define the study's search space and scoring (for resume checks)."""
    keep = {k: v for k, v in spec.to_dict().items()
            if k in ("objectives", "model", "data", "device", "finetune", "space", "seed")}
    if keep["space"].get("channel_multiple") == 1:  # the default: studies from before the option resume
        del keep["space"]["channel_multiple"]
    # the study records the criterion it was searched with (user attribute "pruning"), and older
    # studies resume with theirs, so the spec's value does not make a study a different one
    keep["space"].pop("pruning", None)
    for key, default in (("norm", "train"), ("dropout", True), ("distill", 0.0), ("temperature", 2.0)):  # likewise
        if keep["finetune"].get(key) == default:
            del keep["finetune"][key]
    del keep["finetune"]["device"]  # workers on a GPU host and on CPUs share one study
    return json.dumps(keep, sort_keys=True)
