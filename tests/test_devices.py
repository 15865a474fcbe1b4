"""Device profiles: kernels, micro-models, latency model, profile schema, RAPL, kits, CLI errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.objectives import (
    DeviceProfile, Kernel, LatencyModel, ProfileError, extract_kernels, kernel_type, known_devices, load_device,
)
from edgeslim.objectives.devices import _calibrate, _kits, _micro, _runner, extract_graph, nchwc_block_of
from edgeslim.objectives.devices._kernels import kernel_domain
from edgeslim.objectives.devices._layout import Layout, layout_of, probe_layout
from edgeslim.objectives.devices._model import BOUNDARY_CLASSES, TreeEnsemble, boundary_terms
from edgeslim.objectives.devices._power import RaplReader, find_rapl
from edgeslim.search import DigitsResNet
from edgeslim.search.cli import main
from edgeslim.spaces import CompressionSpace, ObjectiveError, Plan, LayerPlan


def test_kernels_after_fusion_residual_and_quantized():
    model = DigitsResNet().eval()
    kernels = extract_kernels(model, torch.randn(1, 1, 32, 32))
    types = [kernel_type(k) for k in kernels]
    # 13 3x3 convs (BN and ReLU fused), 2 downsample 1x1, 6 residual adds, global pool, fc
    assert types.count("conv_kxk@32") == 13 and types.count("conv_pw@32") == 2
    assert types.count("add@32") == 6 and types.count("gpool@32") == 1 and types.count("gemm@32") == 1
    stem = kernels[0]
    assert (stem.cin, stem.cout, stem.k, stem.h, stem.ho) == (1, 16, 3, 32, 32)
    space = CompressionSpace.build(model, torch.randn(1, 1, 32, 32))
    plan = Plan.from_dicts({"stem.0": 0.5}, {"layer1.0.conv1": LayerPlan(0.5, 8)})
    pruned = extract_kernels(space.realize(model, plan), torch.randn(1, 1, 32, 32))
    assert pruned[0].cout == 8
    assert [kernel_type(k) for k in pruned if k.layer.startswith("layer1.0.conv1")] == ["conv_kxk@8", "conv_pw@8"]


def test_unknown_op_names_the_layer():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)

    with pytest.raises(ObjectiveError, match="no latency kernel for layer 'norm' \\(LayerNorm\\)"):
        extract_kernels(Odd(), torch.randn(1, 4))


def test_time_group_interleaves_windows_and_keeps_run_bounds():
    """Sessions take turns in ``rounds`` windows; each window opens with one warm-up run (the
    first with the whole warm-up); min_runs and max_runs bound each session's timed runs."""
    log: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, _out: Any, _feed: Any) -> None:
            log.append(self.name)

    proto = {"warmup": 4, "min_runs": 6, "max_runs": 6, "budget_s": 0.0, "spike_factor": 10.0, "rounds": 3}
    out = _runner.time_group([Fake("a"), Fake("b")], [{}, {}], proto, keep_times=True)
    windows = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert windows == ["a", "b"] * 3
    assert log.count("a") == log.count("b") == 4 + 2 * 1 + 6  # warm-up, one per later window, timed runs
    assert [r["runs"] for r in out] == [6, 6] and all(len(r["times_ms"]) == 6 for r in out)
    assert "times_ms" not in _runner.time_group([Fake("c")], [{}], proto)[0]
    capped = _runner.time_group([Fake("d")], [{}], {**proto, "min_runs": 20, "max_runs": 4})[0]
    assert capped["runs"] == 4  # max_runs holds over all windows, not per window
    # a meter read around each window (1 mJ per run here): energy per inference counts timed
    # runs only, and one window without a reading leaves the result without energy
    log.clear()
    metered = _runner.time_group([Fake("e"), Fake("f")], [{}, {}], proto, energy_reader=lambda: 1e-3 * len(log))
    assert [m["energy_mj"] for m in metered] == pytest.approx([1.0, 1.0])
    readings = iter([0.0, None] + [0.0] * 40)
    assert "energy_mj" not in _runner.time_group([Fake("g")], [{}], proto, energy_reader=lambda: next(readings))[0]


@pytest.mark.parametrize("threads, most_open", [(1, 3), (2, 1)])
def test_measure_files_keeps_multi_thread_sessions_apart(monkeypatch, threads, most_open):
    """One thread: the files' sessions are open together and take turns. More: each session owns
    a thread pool that slows the others, so only one is ever open."""
    alive, peak = [0], [0]

    class Fake:
        def __init__(self) -> None:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def __del__(self) -> None:
            alive[0] -= 1

        def run(self, _out: Any, _feed: Any) -> None:
            pass

        def get_inputs(self) -> list[Any]:
            return []

        def get_outputs(self) -> list[Any]:
            return []

    monkeypatch.setattr(_runner, "make_session", lambda path, n: Fake())
    proto = {"warmup": 1, "min_runs": 3, "max_runs": 3, "budget_s": 0.0}
    out = _runner.measure_files(["a", "b", "c"], threads, [0, 1, 2], proto)
    assert len(out) == 3 and all(m["runs"] == 3 for m in out) and peak[0] == most_open


def _fake_files(state: dict[str, float], base: dict[str, float]) -> Any:
    """A measure_files stand-in: each file's time is its base time x the device's current state."""
    def measure(paths: list[str], threads: int, seeds: list[int], protocol: Any = None,
                energy_reader: Any = None, *_: Any) -> list[dict[str, Any]]:
        state["calls"] += 1
        return [{"p50_ms": base.get(p, 0.1) * state["slow"], "p95_ms": base.get(p, 0.1) * state["slow"] * 1.1,
                 "runs": 10, "rejected": 0, "io_bytes": 8} for p in paths]
    return measure


def test_kit_run_measures_a_slow_stretch_again(monkeypatch):
    """Groups timed while the reference kernels ran 60 % slow for two timings in a row are timed
    again once the device is back; one slow timing alone is noise and changes nothing."""
    n_ref = len(_calibrate.REFERENCE_KERNELS)
    entries: list[dict[str, Any]] = []
    slow_at: set[int] = set()
    for t in range(6):  # a timing, then two groups of two micro-models (none after the last)
        entries += [{"file": f"r{i}", "reference": i, "group": f"t{t}"} for i in range(n_ref)]
        for g in range(2 if t < 5 else 0):
            first = len(entries)
            entries += [{"file": f"k{t}{g}{j}", "kernel": {}, "group": f"g{t}{g}"} for j in range(2)]
            if t in (2, 3):
                slow_at.update((first, first + 1))
    base = {e["file"]: 1.0 + 0.5 * e["reference"] if "reference" in e else 0.2 for e in entries}
    # the device ran 1.6x slow from the third timing into the fourth's groups
    slow = {i for i, e in enumerate(entries) if "reference" in e and e["group"] in ("t2", "t3")} | slow_at
    results = [{"p50_ms": base[e["file"]] * (1.6 if i in slow else 1.0), "p95_ms": 1.0, "runs": 10, "rejected": 0,
                "io_bytes": 8} for i, e in enumerate(entries)]
    state = {"slow": 1.0, "calls": 0}
    monkeypatch.setattr(_runner, "measure_files", _fake_files(state, base))
    paths = [e["file"] for e in entries]
    kept = [dict(r) for r in results]
    summary = _runner.remeasure_excursions(entries, results, paths, 1, sleep=lambda s: None)
    assert summary is not None and summary["back"] and summary["waited_s"] == 0
    redone = [i for i, r in enumerate(results) if r.get("remeasured")]
    # the slow timings' own groups and the ones between them (interpolated factor over 1.15)
    assert set(redone) >= slow_at and summary["replaced"] == summary["measurements"] == len(redone)
    assert all(results[i]["p50_ms"] == pytest.approx(0.2) and results[i]["first_p50_ms"] == kept[i]["p50_ms"]
               for i in redone)
    assert all(results[i] == kept[i] for i in range(len(entries)) if i not in redone)
    # one slow timing alone (smoothed away): nothing to do
    lone_slow = [{**r, "p50_ms": base[e["file"]] * (1.6 if e["group"] == "t2" else 1.0)} for r, e in zip(kept, entries)]
    assert _runner.remeasure_excursions(entries, lone_slow, paths, 1, sleep=lambda s: None) is None
    # a device that stays slow: the wait gives up, and nothing is replaced
    state["slow"] = 1.6
    naps: list[float] = []
    monkeypatch.setitem(_runner.WAIT, "limit_s", 30.0)
    stuck = [dict(r) for r in kept]
    summary = _runner.remeasure_excursions(entries, stuck, paths, 1, sleep=naps.append)
    assert summary is not None and not summary["back"] and summary["replaced"] == 0
    assert naps == [15.0, 15.0] and stuck == kept


def test_calibration_measures_a_slow_stretch_again(monkeypatch):
    """A local calibration whose device slowed down for a while measures that stretch again at
    the end; chains are measured again with their parts, in one group, as the first time."""
    monkeypatch.setattr(_calibrate, "MODES", {"quick": (16, 1, 4, 2), "full": (16, 1, 4, 2)})
    monkeypatch.setattr(_calibrate, "CHAINS", {"quick": 6, "full": 6})
    monkeypatch.setattr(_calibrate, "TRACK_EVERY", 8)
    state = {"slow": 1.0, "calls": 0}
    fake = _fake_files(state, {})

    def measure(paths: list[str], *rest: Any, **kw: Any) -> list[dict[str, Any]]:
        # 60 % slow from the 6th to the 14th group of the run (the design and the chains)
        state["slow"] = 1.6 if 6 <= state["calls"] < 14 else 1.0
        out = fake(paths, *rest, **kw)
        for m, p in zip(out, paths):  # times and sizes that differ by model, so the fit has something to fit
            m["p50_ms"] *= 1 + Path(p).stat().st_size / 2e5
            m["io_bytes"] = Path(p).stat().st_size
        return out

    monkeypatch.setattr(_runner, "measure_files", measure)
    notes: list[str] = []
    result = _calibrate.calibrate("t", 1, types=("conv_kxk@32", "gemm@32"), say=notes.append)
    r = result.remeasured
    assert r is not None and r["back"] and r["replaced"] > 0 and r["worst_factor"] == pytest.approx(1.6)
    assert notes == []  # the device was back at once: no waiting
    track = result.track
    assert track is not None
    # the track shows the slow stretch, and no measurement taken in it is left
    assert max(track.factor(s) for s, _ in track.points) == pytest.approx(1.6)
    assert [m for m in result.measurements if "seq" in m and track.factor(m["seq"]) > 1.15] == []
    for c in result.chains:  # each chain's lone times are its parts', measured in its group
        assert [m["seq"] for m in c["lone"]] == [c["seq"] + 1 + i for i in range(len(c["lone"]))]


@pytest.mark.parametrize("ktype", _micro.KERNEL_TYPES)
def test_micro_models_are_valid_and_run(ktype, tmp_path):
    k = _micro.random_kernel(ktype, np.random.default_rng(0))
    assert kernel_type(k) == ktype and k.macs <= _micro.MAX_MACS
    model = _micro.micro_model(k)
    onnx.checker.check_model(model)
    path = tmp_path / "k.onnx"
    onnx.save(model, str(path))
    out = _runner.measure_file(str(path), 1, 0, {"warmup": 1, "min_runs": 3, "max_runs": 3, "budget_s": 0.0})
    assert out["runs"] == 3 and 0 < out["p50_ms"] <= out["p95_ms"] and out["io_bytes"] > 0


def _power_law(k: Kernel) -> float:
    return 2e-6 * k.macs ** 0.95


def _additive(k: Kernel) -> float:  # fixed cost + compute + activation traffic, the shape of real kernels
    return 2e-3 + 1e-8 * k.macs + 4e-8 * (k.in_elems + k.out_elems) * k.act_bytes


def _synthetic_model(noise: float = 0.0, truth=_power_law, select: bool = False) -> tuple[LatencyModel, list[Kernel]]:
    rng = np.random.default_rng(0)
    kernels = _calibrate.io_kernels()
    meas = [{"p50_ms": 0.02 + 1e-7 * k.cin * 8, "p95_ms": 0.025, "io_bytes": k.cin * 8} for k in kernels]
    for t in ("conv_kxk@32", "gemm@32"):
        for _ in range(50):
            k = _micro.random_kernel(t, rng)
            lat = truth(k) * (1 + noise * rng.standard_normal())
            kernels.append(k)
            meas.append({"p50_ms": 0.02 + lat, "p95_ms": 0.03 + 1.2 * lat, "io_bytes": 0})
    return LatencyModel(device="synthetic").fit(kernels, meas, select=select), kernels


@pytest.mark.parametrize("truth", [_power_law, _additive])
def test_latency_model_selects_the_right_form_and_round_trips(truth):
    """Cross-validation picks a form that extrapolates: log-linear for a power law, work terms for sums."""
    model, _ = _synthetic_model(truth=truth, select=True)
    rng = np.random.default_rng(9)
    for _ in range(20):
        k = _micro.random_kernel("conv_kxk@32", rng)
        assert model.predict_kernels([k])[0][0] == pytest.approx(truth(k), rel=0.15)
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())), device="synthetic")
    ks = [_micro.random_kernel("gemm@32", rng) for _ in range(5)]
    assert again.predict(ks, 4096) == pytest.approx(model.predict(ks, 4096))
    p50, p95 = model.predict(ks, 4096)
    assert p95 > p50 > 0


def test_batched_prediction_equals_each_types_own_regressor():
    """The stacked all-types evaluator (fast path) computes exactly what each type's model does."""
    from edgeslim.objectives.devices._kernels import kernel_matrix

    model, _ = _synthetic_model(noise=0.2, truth=_additive, select=True)
    rng = np.random.default_rng(3)
    ks = [_micro.random_kernel(t, rng) for t in ("conv_kxk@32", "gemm@32") for _ in range(10)]
    fast = np.array([p for p, _ in model.predict_kernels(ks)])
    ref = []
    for k in ks:
        x, terms = kernel_matrix([k])
        tm = model.types_[kernel_type(k)]
        ref.append(float(np.exp(tm.predict_log(x, terms))[0]))
    assert fast == pytest.approx(ref, rel=1e-12)


def test_chain_models_run_and_match_their_kernels():
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    for _ in range(6):
        ks, acts = _micro.random_chain(rng)
        assert all(a.cout == b.cin for a, b in zip(ks, ks[1:]))
        model = _micro.chain_model(ks, acts)
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        shape = sess.get_inputs()[0].shape
        out = sess.run(None, {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)})[0]
        assert out.shape[1] == ks[-1].cout
        relus = sum(n.op_type == "Relu" for n in model.graph.node)
        assert relus == 1 + sum(acts)  # the last kernel's, plus one per activated boundary
    residual = next(c for c in (_micro.random_chain(rng) for _ in range(50)) if len(c[0]) == 3 and c[0][-1].op == "add")
    adds = [n for n in _micro.chain_model(*residual).graph.node if n.op_type == "Add"]
    assert len(adds) == 1 and adds[0].input[1] == "k0_out"  # the skip connection from the first conv
    inverted = next(c for c in (_micro.random_chain(rng) for _ in range(200))
                    if len(c[0]) == 4 and c[0][1].groups > 1 and c[0][-1].op == "add")
    adds = [n for n in _micro.chain_model(*inverted).graph.node if n.op_type == "Add"]
    assert adds[-1].input[1] == "x"  # an inverted residual adds the chain's input
    assert _micro.chain_edges(*inverted) == [(0, 1, True), (1, 2, True), (2, 3, False)]



def test_two_block_residual_chain_has_the_edges_of_the_torch_network():
    """A chain that runs a residual block into a second one and a head has the boundaries
    (add->conv, add->add, add->gpool) that :func:`extract_graph` reads off the same network."""
    from torch import nn

    from edgeslim.objectives.devices._kernels import extract_graph

    class TwoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.c[0](x))
            a = torch.relu(self.c[1](a) + a)
            b = torch.relu(self.c[3](torch.relu(self.c[2](a))) + a)
            return torch.relu(self.head(b.mean((2, 3))))

    rng = np.random.default_rng(0)
    ks, acts = next(c for c in (_micro.random_chain(rng) for _ in range(400))
                    if [k.op for k in c[0]] == ["conv", "conv", "add", "conv", "conv", "add", "gpool", "gemm"])
    _, torch_edges = extract_graph(TwoBlocks().eval(), torch.randn(1, 8, 8, 8))
    assert sorted(_micro.chain_edges(ks, acts)) == sorted(torch_edges)
    adds = [n for n in _micro.chain_model(ks, acts).graph.node if n.op_type == "Add"]
    assert [n.input[1] for n in adds] == ["k0_out", "k2_out"]  # the second block's shortcut is the first add

def _gemm_chains(model: LatencyModel, seed: int, kernel_bias: float) -> list[tuple[Any, ...]]:
    """Chains whose lone kernels really take ``kernel_bias`` x the model's prediction, and run
    2 us faster per (f>f) boundary than those lone kernels."""
    rng = np.random.default_rng(seed)
    chains = []
    for _ in range(60):
        n = int(rng.integers(2, 5))
        ks = [Kernel("gemm", 32, int(rng.integers(8, 64)), int(rng.integers(8, 64))) for _ in range(n)]
        ks = [ks[0]] + [Kernel("gemm", 32, a.cout, b.cout) for a, b in zip(ks, ks[1:])]
        edges = _micro.chain_edges(ks, [True] * (n - 1))
        lone_ms = kernel_bias * sum(p for p, _ in model.predict_kernels(ks))
        chains.append((ks, edges, model.overhead_ms(0) + lone_ms - 0.002 * (n - 1), 0.0, lone_ms))
    return chains


def test_pool_between_int8_convs_stands_on_the_quantized_side():
    """Export leaves a max pool quantized only between two int8 convs (ONNX Runtime's NHWC uint8
    pool): its boundaries are then q>q; next to a float or 4-bit conv, or at a fork, it is float."""
    from edgeslim.objectives.devices._model import boundary_terms

    def classes(first_bits: int, last_bits: int, fork: bool = False) -> set[str]:
        ks = [Kernel("conv", first_bits, 16, 16, 3, h=8, w=8, ho=8, wo=8),
              Kernel("pool", 32, 16, 16, 2, 2, h=8, w=8, ho=4, wo=4),
              Kernel("conv", last_bits, 16, 16, 3, h=4, w=4, ho=4, wo=4)]
        edges = [(0, 1, True), (1, 2, False)]
        if fork:
            ks.append(Kernel("conv", 8, 16, 16, 1, h=4, w=4, ho=4, wo=4))
            edges.append((1, 3, False))
        row = boundary_terms(ks, edges, 8)
        return {c for i, c in enumerate(BOUNDARY_CLASSES) if row[2 * i]}

    assert classes(8, 8) == {"q>q+act", "q>q"}
    assert classes(8, 32) == {"q>c", "c>c"} and classes(4, 8) == {"q>c", "c>q"}
    assert classes(8, 8, fork=True) == {"q>c", "c>q"}


def test_boundary_classes_follow_the_devices_nchwc_block():
    """The block is the device's (probed at calibration), not a constant: 24 channels chain in
    NCHWc with AVX2's block of 8, not with AVX-512's 16; with no blocking (1) nothing is ``c``."""
    from edgeslim.objectives.devices import LatencyModel
    from edgeslim.objectives.devices._model import boundary_terms

    ks = [Kernel("conv", 32, 24, 24, 3, h=8, w=8, ho=8, wo=8), Kernel("pool", 32, 24, 24, 2, 2, h=8, w=8, ho=4, wo=4),
          Kernel("conv", 32, 24, 24, 3, h=4, w=4, ho=4, wo=4)]
    edges = [(0, 1, True), (1, 2, False)]

    def classes(block: int) -> set[str]:
        row = boundary_terms(ks, edges, block)
        return {c for i, c in enumerate(BOUNDARY_CLASSES) if row[2 * i]}

    assert classes(8) == {"c>c"}
    assert classes(16) == {"c>f", "f>c"}
    assert classes(1) == {"f>f"}
    model, _ = _synthetic_model()
    model.layout = Layout.assumed(16)
    assert LatencyModel.from_dict(model.to_dict()).layout == Layout.assumed(16)
    legacy = {k: v for k, v in model.to_dict().items() if k != "layout"}
    with pytest.raises(ValueError, match="layout is missing"):  # refit, see the profile-level test
        LatencyModel.from_dict(legacy)


def test_layout_rules_are_probed_from_onnx_runtimes_own_graphs():
    """The probe's rules explain every test graph ONNX Runtime optimized here, and on x86 they are
    the ones assumed for kits' devices from their ISA flags; low-rank halves with fewer input
    channels than the block read the plain layout, so their incoming edge is a reorder."""
    lay = probe_layout()
    assert lay.source == "probed"
    if lay.block > 1:
        assert lay == Layout.assumed(lay.block, "probed")
        thin = Kernel("conv", 32, cin=2, cout=lay.block * 4, k=1, h=8, w=8, ho=8, wo=8)
        wide = Kernel("conv", 32, cin=lay.block * 4, cout=2, k=3, h=8, w=8, ho=8, wo=8)
        row = boundary_terms([wide, thin], [(0, 1, False)], lay)
        assert row[2 * BOUNDARY_CLASSES.index("c>f")] == 1  # the low-rank pair meets through a reorder
        odd = Kernel("conv", 32, cin=lay.block + 1, cout=16, k=3, h=8, w=8, ho=8, wo=8)
        assert kernel_domain(odd, lay, "in") == kernel_domain(odd, lay) == "f"  # not blocked at all
    fact = {"layout": lay.to_dict(), "nchwc_block": lay.block}
    assert layout_of(fact) == lay and layout_of({"isa_flags": ["avx2"]}) == Layout.assumed(8)
    with pytest.raises(ValueError, match="layout.pool_multiple"):
        Layout.from_dict({**lay.to_dict(), "pool_multiple": 0})


def test_the_block_comes_from_the_probe_or_the_reported_isa():
    from edgeslim.objectives.devices import nchwc_block_of, probe_nchwc_block

    assert nchwc_block_of({"nchwc_block": probe_nchwc_block()}) == (probe_nchwc_block(), "probed")
    assert nchwc_block_of({"isa_flags": ["avx2", "avx512f"]})[0] == 16
    assert nchwc_block_of({"isa_flags": ["asimd"]})[0] == 1


def test_boundary_terms_recover_a_known_saving():
    """Chains measured faster than their lone kernels by a known amount per boundary class: the fit
    finds that amount, and predictions with edges drop by it."""
    model, _ = _synthetic_model()
    chains = _gemm_chains(model, 4, 1.0)
    model.fit_boundaries([c[:4] + (None,) for c in chains])  # lone times predicted by the model
    ks, edges, p50, _, _ = chains[0]
    assert model.predict(ks, 0, edges)[0] == pytest.approx(p50, rel=0.02)
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.predict(ks, 0, edges)[0] == pytest.approx(model.predict(ks, 0, edges)[0])


def test_boundary_fit_on_measured_lone_kernels_ignores_kernel_model_error():
    """When the kernel model is 20 % off, savings fitted against its predictions absorb that error;
    fitted against the chain's own lone kernels (measured) they come out right."""
    model, _ = _synthetic_model()
    chains = _gemm_chains(model, 5, 0.8)  # the kernels really run 20 % faster than predicted
    i = 2 * BOUNDARY_CLASSES.index("f>f")
    model.fit_boundaries(chains)
    assert model.boundaries_[i] == pytest.approx(0.002, rel=0.05)
    assert abs(model.kernel_costs_).max() < 1e-4  # and no in-network kernel cost
    model.fit_boundaries([c[:4] + (None,) for c in chains])
    # the model's 20 % error, mistaken for in-network effects: each chain's fitted correction is
    # far from its true saving of 2 us per boundary
    from edgeslim.objectives.devices._model import boundary_terms, domain_counts

    for ks, edges, *_ in chains[:10]:
        fitted = boundary_terms(ks, edges, 8) @ model.boundaries_ - domain_counts(ks, edges, 8) @ model.kernel_costs_
        assert abs(fitted - 0.002 * len(edges)) > 0.1 * 0.002 * len(edges)


def test_uncovered_kernel_type_is_an_error_naming_layer_and_device():
    model, _ = _synthetic_model()
    with pytest.raises(ObjectiveError, match="layer 'features.3'.*conv_dw@8.*'synthetic'"):
        model.predict([Kernel("conv", 8, 16, 16, 3, 1, 16, 8, 8, 8, 8, layer="features.3")])


def test_unfitted_model_refuses():
    with pytest.raises(ObjectiveError, match="not fitted"):
        LatencyModel().predict([Kernel("gemm")])


def test_tree_ensemble_matches_sklearn():
    from sklearn.ensemble import GradientBoostingRegressor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 4))
    y = x[:, 0] ** 2 + np.sin(x[:, 1])
    gbr = GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0).fit(x, y)
    trees = TreeEnsemble.from_sklearn(gbr)
    init = float(np.ravel(gbr.init_.constant_)[0])
    assert np.allclose(trees.predict(x) + init, gbr.predict(x))


def _profile(tmp_path, name="toy"):
    model, _ = _synthetic_model()
    p = DeviceProfile(name=name, threads=1, latency_model=model, facts={"onnxruntime": "0.0-test"}, profile_id="abc")
    return p.save(tmp_path / f"{name}.json")


def test_profile_save_load_and_never_overwrite(tmp_path):
    path = _profile(tmp_path)
    with pytest.warns(UserWarning, match="calibrated with onnxruntime 0.0-test"):
        loaded = load_device("toy", devices_dir=tmp_path)
    assert loaded.predicts_latency and loaded.profile_id == "abc"
    with pytest.raises(ProfileError, match="already exists"):
        loaded.save(path)
    loaded.save(path, replace=True)
    assert len(list(tmp_path.glob("toy.*.bak.json"))) == 1
    assert known_devices(tmp_path) == ["local", "toy"]


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("threads"), "field threads is missing"),
    (lambda d: d.update(threads="one"), "field threads must be int"),
    (lambda d: d["model"]["types"]["gemm@32"].pop("coef"), "field model.types.gemm@32.coef is missing"),
    (lambda d: d["model"]["types"]["gemm@32"].update(coef=[1.0]), "model.types.gemm@32.coef has 1 values"),
    (lambda d: d.update(version=7), "field version is 7"),
    (lambda d: d["energy"].pop("static_w"), "field energy.static_w is missing"),
])
def test_hand_edited_profile_names_the_field(tmp_path, edit, match):
    path = _profile(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=match):
        load_device("toy", devices_dir=tmp_path)


def test_corrupted_profile_and_unknown_device(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_device("broken", devices_dir=tmp_path)
    with pytest.raises(ProfileError, match=r"unknown device 'pi5'; known devices: \['local', 'broken'\]"):
        load_device("pi5", devices_dir=tmp_path)


def test_threads_beyond_cores_is_refused(capsys, tmp_path):
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(ProfileError, match="exceeds this machine"):
        load_device("local", threads=too_many)
    assert main(["calibrate", "--device", "x", "--threads", str(too_many), "--devices-dir", str(tmp_path)]) == 2
    assert "exceeds this machine" in capsys.readouterr().err


def test_rapl_reader_handles_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone must not be picked
    reader = find_rapl(tmp_path)
    assert isinstance(reader, RaplReader) and reader.zone == zone
    assert reader() == 0.0
    (zone / "energy_uj").write_text("999500\n")
    assert reader() == pytest.approx(0.0005)
    (zone / "energy_uj").write_text("500\n")  # wrapped: 500 to the top, 1 to zero, 500 after
    assert reader() == pytest.approx(0.0005 + 0.001001)
    assert find_rapl(tmp_path / "none") is None


def test_power_command_reader_integrates_watts(tmp_path):
    """A meter command printing 2 W (with junk lines between) integrates to ~2 J per second."""
    import sys
    import time

    from edgeslim.objectives.devices._power import PowerCommandReader

    script = tmp_path / "meter.py"
    script.write_text("import sys, time\nwhile True:\n    print('2.0 W'); print('junk'); sys.stdout.flush()\n"
                      "    time.sleep(0.005)\n")
    reader = PowerCommandReader(f"{sys.executable} {script}")
    try:
        time.sleep(0.3)  # the first readings arrive
        start, t0 = reader(), time.monotonic()
        time.sleep(0.5)
        joules, seconds = reader() - start, time.monotonic() - t0
    finally:
        reader.close()
    assert joules == pytest.approx(2.0 * seconds, rel=0.2)


def test_energy_constants_are_recovered_from_metered_runs():
    """fit_energy recovers per-MAC, per-byte and static constants from metered micro-models,
    and returns None for unmetered runs (the profile then keeps the labelled defaults)."""
    kernels = _micro.design(("conv_kxk@32", "conv_kxk@8", "gemm@4", "conv_dw@32"), 12, seed=3)
    truth = {32: 4.0, 8: 1.0, 4: 0.6}  # pJ per MAC
    meas = []
    for i, k in enumerate(kernels):
        moved = k.weight_elems * k.bits / 8 + k.act_bytes * (k.in_elems + k.out_elems)
        p50 = 0.05 + 1e-6 * k.macs + 0.01 * (i % 3)  # latency not a multiple of the work terms
        mj = (truth[k.compute_bits] * k.macs + 20.0 * moved) * 1e-9 + 1.5 * p50
        meas.append({"p50_ms": p50, "energy_mj": mj})
    fitted = _kits.fit_energy(kernels, meas, "test meter")
    assert fitted is not None and fitted.measured and fitted.source == "test meter"
    used = {k.compute_bits for k in kernels}  # 4-bit Linears compute on int8 (MatMulNBits): no 4-bit MACs
    assert {b: fitted.mac_pj_by_bits[b] for b in used} == pytest.approx({b: truth[b] for b in used}, rel=1e-3)
    assert fitted.byte_pj == pytest.approx(20.0, rel=1e-3) and fitted.static_w == pytest.approx(1.5, rel=1e-3)
    assert _kits.fit_energy(kernels, [{"p50_ms": m["p50_ms"]} for m in meas], "none") is None


def test_speed_track_follows_the_device_and_ignores_one_spike():
    track = _calibrate.SpeedTrack()
    assert track.factor(0) == 1.0 and track.reference() == []
    for i, scale in enumerate([1.0, 1.0, 1.0, 1.5, 1.0, 1.2, 1.2, 1.2, 1.2]):
        track.add(100 * i, [2.0 * scale, 0.5 * scale])
    assert track.reference() == pytest.approx([2.4, 0.6])  # each kernel's median: the 1.2 state
    assert track.factor(300) == pytest.approx(1 / 1.2)  # the one slow timing is smoothed away
    assert track.factor(50) == pytest.approx(1 / 1.2) and track.factor(700) == pytest.approx(1.0)
    # a kit's entries: each run of reference entries is one timing, placed at the entry after it
    n = len(_calibrate.REFERENCE_KERNELS)
    entries = [{"reference": i, "p50_ms": 1.0 + i} for i in range(n)] + [{"kernel": {}, "p50_ms": 0.1}] * 3
    entries += [{"reference": i, "p50_ms": 2.0 + 2 * i} for i in range(n)]
    kit_track = _calibrate.SpeedTrack.from_entries(entries)
    assert [s for s, _ in kit_track.points] == [n, 2 * n + 3]
    assert kit_track.points[1][1] == [2.0 + 2 * i for i in range(n)]


def test_kit_carries_focus_networks_with_their_parts(tmp_path, monkeypatch):
    """A whole focus candidate travels in the kit, followed by its kernels alone; the fit on the
    device's measurements turns it into a network record with its lone times."""
    from edgeslim.search._check import focus_networks

    monkeypatch.setattr(_kits, "MODES", {"quick": (2, 0, 0, 0), "full": (2, 0, 0, 0)})
    monkeypatch.setattr(_kits, "CHAINS", {"quick": 3, "full": 3})
    nets = focus_networks(["digits-cnn"], 1, tmp_path)
    assert [n["name"] for n in nets] == ["digits-cnn/dense"] and Path(nets[0]["path"]).is_file()
    kit = _kits.write_kit(tmp_path / "kit", 1, "quick", networks=nets)
    entries = json.loads((kit / "kit.json").read_text())["entries"]
    net = next(e for e in entries if "network" in e)
    assert (kit / net["file"]).is_file() and net["network"]["name"] == "digits-cnn/dense"
    assert [entries[i]["kernel"] for i in net["parts"]] == [{**k, "layer": ""} for k in net["network"]["kernels"]]
    assert net["network"]["kernels"][0]["layer"] == "features.0"  # the record keeps the layer names
    rng = np.random.default_rng(0)  # stand-in measurements: the fit's bookkeeping is what is tested
    measured = {"entries": [{**e, "p50_ms": float(rng.uniform(0.02, 0.5)), "p95_ms": 0.6, "runs": 20,
                             "rejected": 0, "io_bytes": 1024 * (1 + i % 7)} for i, e in enumerate(entries)]}
    result = _kits.fit_measurements(measured, "remote")
    records = [c for c in result.chains if "network" in c]
    assert len(records) == 1 and len(records[0]["lone"]) == len(net["parts"])
    assert records[0]["p50_ms"] == measured["entries"][entries.index(net)]["p50_ms"]


def test_kit_round_trip_and_version_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_kits, "MODES", {"quick": (3, 0, 0, 0), "full": (3, 0, 0, 0)})
    monkeypatch.setattr(_kits, "CHAINS", {"quick": 25, "full": 25})
    monkeypatch.setattr(_kits, "TRACK_EVERY", 40)
    from edgeslim.search import _structures

    monkeypatch.setitem(_structures.STRUCTURES, "quick", 2)
    kit = tmp_path / "kit"
    assert main(["calibrate", "--kit", str(kit)]) == 0
    manifest = json.loads((kit / "kit.json").read_text())
    structures = [e for e in manifest["entries"] if e.get("structure")]
    assert len(structures) == 2 and all((kit / e["file"]).is_file() and e["parts"] for e in structures)
    assert manifest["kit_version"] == _runner.KIT_VERSION and (kit / "run_kit.py").is_file()
    entries = manifest["entries"]
    chains = [e for e in entries if "chain" in e]
    parts = sum(len(e["parts"]) for e in chains + structures)
    # the reference kernels open and close the kit and are timed every TRACK_EVERY models between
    is_ref = "".join("r" if "reference" in e else "m" for e in entries)
    runs = [r for r in is_ref.split("m") if r]
    n_ref = len(_calibrate.REFERENCE_KERNELS)
    timing = "r" * n_ref + "m" * len(_micro.IO_SIZES)  # reference kernels, then the Identity models
    assert is_ref.startswith(timing) and is_ref.endswith(timing)
    assert all(len(r) == n_ref for r in runs) and len(runs) >= 3
    longest = max(len(m) for m in is_ref.split("r") if m)
    # + one chain's or network's parts
    assert longest <= _kits.TRACK_EVERY + len(_micro.IO_SIZES) + 1 + max(len(e["parts"]) for e in chains + structures)
    refs = len(runs) * n_ref
    for e in chains:  # a timing never separates a chain from its parts
        first = entries.index(e)
        assert "r" not in is_ref[first: max(e["parts"]) + 1]
    assert len(chains) == 25
    # each timing also measures the Identity (overhead) models
    io = [e for e in entries if e.get("kernel", {}).get("op") == "io"]
    assert len(io) == len(runs) * len(_micro.IO_SIZES)
    assert len(entries) == len(io) + 3 * len(_micro.KERNEL_TYPES) + 25 + parts + refs + len(structures)
    for e in chains:  # each chain's kernels are in the kit alone too, timed together with it
        assert [entries[i]["kernel"] for i in e["parts"]] == e["chain"]["kernels"]
        assert {entries[i]["group"] for i in e["parts"]} == {e["group"]}
        assert sum(x["group"] == e["group"] for x in entries) == 1 + len(e["parts"])
    # groups are runs of consecutive entries: a timing (reference + Identity models) is one, lone
    # design kernels come GROUP at a time
    starts = [i for i, e in enumerate(entries) if i == 0 or e["group"] != entries[i - 1]["group"]]
    assert len(starts) == len({e["group"] for e in entries})
    assert all(entries[i]["group"] == entries[0]["group"] for i in range(len(timing)))
    design = [e for e in entries if e["file"].startswith("models/k")]
    assert max(sum(x["group"] == g for x in design) for g in {e["group"] for e in design}) == _calibrate.GROUP
    monkeypatch.setitem(_runner.PROTOCOL, "budget_s", 0.0)
    monkeypatch.setitem(_runner.PROTOCOL, "min_runs", 3)
    monkeypatch.setitem(_runner.PROTOCOL, "warmup", 1)
    manifest["protocol"] = dict(_runner.PROTOCOL)
    (kit / "kit.json").write_text(json.dumps(manifest))
    out = tmp_path / "measurements.json"
    assert _runner._kit_main([str(kit), "--out", str(out)]) == 0
    devices = tmp_path / "devices"
    assert main(["calibrate", "--fit", str(out), "--device", "remote", "--devices-dir", str(devices)]) == 0
    profile = load_device("remote", devices_dir=devices)
    assert profile.predicts_latency and len(profile.latency_model.types_) == len(_micro.KERNEL_TYPES)
    assert profile.latency_model.boundaries_ is not None  # the kit's chains fitted the boundary terms
    saved = json.loads((devices / "remote.json").read_text())
    stored = [c for c in saved["chains"] if "chain" in c]
    assert len(stored) == 25 and all(len(c["lone"]) == len(c["chain"]["kernels"]) for c in stored)
    assert sum(bool(c.get("structure")) and len(c["lone"]) > 0 for c in saved["chains"]) == 2  # with their parts
    assert len(saved["reference"]["p50_ms"]) == len(_calibrate.REFERENCE_KERNELS)
    assert len(saved["speed_track"]["points"]) == len(runs)  # the device's speed over the run
    # the overhead curve: one point per Identity size, the median of its timings over the run
    assert [b for b, _ in profile.latency_model.overhead_] == sorted({m["io_bytes"] for m in saved["measurements"]
                                                                     if m["kernel"]["op"] == "io"})
    # --refit fits the stored measurements again: the same data and fit give the same model, the
    # previous file is kept, and a refit that would measure anything is refused
    ks = [Kernel(**m["kernel"]) for m in saved["measurements"] if m["kernel"]["op"] != "io"][:40]
    before = [profile.latency_model.predict([k], 1000)[0] for k in ks]
    assert main(["calibrate", "--refit", "--device", "remote", "--devices-dir", str(devices)]) == 0
    again = load_device("remote", devices_dir=devices)
    assert [again.latency_model.predict([k], 1000)[0] for k in ks] == pytest.approx(before, rel=1e-9)
    assert len(list(devices.glob("remote.*.bak.json"))) == 1
    assert json.loads((devices / "remote.json").read_text())["measurements"] == saved["measurements"]
    assert main(["calibrate", "--refit", "--device", "remote", "--for", "digits-cnn",
                 "--devices-dir", str(devices)]) == 2
    assert main(["calibrate", "--refit", "--device", "nope", "--devices-dir", str(devices)]) == 2
    assert "unknown device 'nope'" in capsys.readouterr().err
    data = json.loads(out.read_text())
    data["kit_version"] = 99
    out.write_text(json.dumps(data))
    assert main(["calibrate", "--fit", str(out), "--device", "other", "--devices-dir", str(devices)]) == 2
    assert "kit version 99" in capsys.readouterr().err


def _cover_digits_cnn() -> LatencyModel:
    """A synthetic model covering every kernel type a compressed digits CNN can run."""
    ks, ms = [], []
    rng = np.random.default_rng(1)
    for t in ("conv_kxk@8", "conv_kxk@4", "conv_kxk@32", "conv_pw@8", "conv_pw@4", "conv_pw@32", "gemm@8",
              "gemm@4", "gemm@32", "pool@32", "gpool@32"):
        for _ in range(6):
            k = _micro.random_kernel(t, rng)
            ks.append(k)
            ms.append({"p50_ms": 0.02 + 1e-6 * k.macs, "p95_ms": 0.03 + 1e-6 * k.macs, "io_bytes": 0})
    io_k = _calibrate.io_kernels()
    io_m = [{"p50_ms": 0.02, "p95_ms": 0.025, "io_bytes": k.cin * 8} for k in io_k]
    return LatencyModel(device="cover").fit(io_k + ks, io_m + ms)


def test_search_with_a_calibrated_profile_predicts_latency(tmp_path):
    import io

    from edgeslim.search import demo_spec, run_search
    from edgeslim.search._spec import DeviceSpec, FinetuneSpec, ModelSpec

    lm = _cover_digits_cnn()
    DeviceProfile(name="fake", threads=1, latency_model=lm, facts={}, profile_id="f1").save(tmp_path / "fake.json")
    spec = demo_spec().replace(trials=2, out_dir=str(tmp_path / "s"), device=DeviceSpec(name="fake"),
                               model=ModelSpec(builtin="digits-cnn", train_epochs=1),
                               finetune=FinetuneSpec(steps=2))
    result = run_search(spec, stream=io.StringIO(), devices_dir=tmp_path)
    trial = result.study.trials[0]
    assert trial.user_attrs["latency_method"].startswith("predicted (estimate)")
    assert "fake" in result.study.user_attrs["device"]
    assert "predicted for fake by its calibrated profile" in result.report_path.read_text()


def test_local_calibration_end_to_end(tmp_path, monkeypatch):
    """A miniature quick calibration: kernels, one adaptive round, chains, profile written and loadable."""
    monkeypatch.setattr(_calibrate, "MODES", {"quick": (3, 1, 2, 1), "full": (3, 1, 2, 1)})
    monkeypatch.setattr(_calibrate, "CHAINS", {"quick": 12, "full": 12})
    monkeypatch.setitem(_runner.PROTOCOL, "budget_s", 0.0)
    monkeypatch.setitem(_runner.PROTOCOL, "min_runs", 3)
    monkeypatch.setitem(_runner.PROTOCOL, "warmup", 1)
    from edgeslim.search import _check

    monkeypatch.setitem(_check.FOCUS_PLANS, "quick", {"min": 2, "max": 2, "seconds": 0.0, "networks": 3})
    from edgeslim.search import _structures

    monkeypatch.setitem(_structures.STRUCTURES, "quick", 3)
    assert main(["calibrate", "--device", "tiny", "--devices-dir", str(tmp_path), "--for", "digits-cnn"]) == 0
    profile = load_device("tiny", devices_dir=tmp_path)
    data = json.loads((tmp_path / "tiny.json").read_text())
    chains = [c for c in data["chains"] if "chain" in c]
    assert len(chains) == 12 and len(data["rounds"]) == 1
    assert all(len(c["lone"]) == len(c["chain"]["kernels"]) for c in chains)
    # whole candidates of the focus model were exported and measured, and joined the boundary fit
    # random structure networks were measured, whole and kernel by kernel, and fitted the in-network costs
    structures = [c for c in data["chains"] if c.get("structure")]
    assert len(structures) == 3 and all(len(c["lone"]) == len(c["network"]["kernels"]) for c in structures)
    assert len(data["model"]["kernel_costs"]) == 4
    nets = [c for c in data["chains"] if "network" in c and not c.get("structure")]
    assert [n["network"]["name"] for n in nets] == ["digits-cnn/dense", "digits-cnn/int8", "digits-cnn/random0"]
    assert all(n["p50_ms"] > 0 and len(n["network"]["edges"]) >= len(n["network"]["kernels"]) - 1 for n in nets)
    measured_shapes = {Kernel(**m["kernel"]).shape for m in data["measurements"]}
    assert all(Kernel(**k).shape in measured_shapes for n in nets for k in n["network"]["kernels"])
    assert all(len(n["lone"]) == len(n["network"]["kernels"]) for n in nets)  # measured alone right after
    assert data["focus"]["plans"] == {"digits-cnn": 5}  # dense, int8, int4 presets + 2 random plans
    assert data["focus"]["networks"] == 3
    assert len(data["reference"]["p50_ms"]) == len(_calibrate.REFERENCE_KERNELS)
    assert all(t > 0 for t in data["reference"]["p50_ms"])
    assert profile.latency_model.boundaries_ is not None
    p50, p95, n = profile.latency_model.predict_module(DigitsResNet().eval(), torch.zeros(1, 1, 32, 32))
    assert n == 23 and p95 >= p50 > 0
    # the focus: every kernel the dense digits CNN runs was measured as it is
    from edgeslim.objectives.devices._kernels import extract_graph
    from edgeslim.search import DigitsCNN

    measured = {Kernel(**m["kernel"]).shape for m in data["measurements"]}
    dense, _ = extract_graph(DigitsCNN().eval(), torch.randn(1, 1, 8, 8))
    assert {k.shape for k in dense} <= measured


def test_check_latency_repeat_reports_measurement_noise(tmp_path, monkeypatch, capsys):
    """check-latency --repeat times each file twice and reports how far the two lie apart."""
    model = _cover_digits_cnn()
    # reference times twice what this machine takes: the check reports the device ~2x faster now
    then = [2 * t for t in _calibrate.measure_reference(1, tmp_path)]
    DeviceProfile(name="cover", threads=1, latency_model=model, facts={}, profile_id="c1",
                  extra={"reference": {"p50_ms": then}}).save(tmp_path / "cover.json")
    code = main(["check-latency", "--device", "cover", "--devices-dir", str(tmp_path), "--workloads", "digits-cnn",
                 "--samples", "2", "--repeat", "--format", "json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2 and all(r["remeasured_ms"] > 0 for r in out["rows"])
    rep = [abs(r["remeasured_ms"] / r["measured_ms"] - 1) for r in out["rows"]]
    assert out["summary"]["repeat_mape"] == pytest.approx(float(np.mean(rep)))
    # p95 predicted and measured on every row, and summarized from them
    assert all(r["predicted_p95_ms"] >= r["predicted_ms"] and r["measured_p95_ms"] >= r["measured_ms"]
               for r in out["rows"])
    tail = [abs(r["predicted_p95_ms"] / r["measured_p95_ms"] - 1) for r in out["rows"]]
    assert out["summary"]["p95_mape"] == pytest.approx(float(np.mean(tail)))
    s = out["summary"]
    assert out["limit"] == ("model" if s["within_10pct"] < s["repeat_within_10pct"] else "noise")
    # the table: repeats on by default, both figures side by side, and which one limits
    assert main(["check-latency", "--device", "cover", "--devices-dir", str(tmp_path), "--workloads", "digits-cnn",
                 "--samples", "2"]) == 0
    table = capsys.readouterr().out
    assert "model vs measured" in table and "measured again" in table
    assert ("the model limits" in table) != ("noise limits" in table)
    assert main(["check-latency", "--device", "cover", "--devices-dir", str(tmp_path), "--workloads", "digits-cnn",
                 "--samples", "2", "--no-repeat"]) == 0
    assert "measured again" not in capsys.readouterr().out
    assert 0.3 < out["speed_ratio"] < 0.8  # about 0.5, give or take this VM's noise
    # each row carries the speed timed around its own measurement; the drift-scaled figures use it
    assert all(0.3 < r["speed"] < 0.8 for r in out["rows"])
    scaled = sorted(abs(r["predicted_ms"] * r["speed"] / r["measured_ms"] - 1) for r in out["rows"])
    assert scaled == pytest.approx(sorted(abs(w["error"]) for w in out["summary_drift_scaled"]["worst"]))


def test_check_latency_warns_when_this_is_not_the_profiles_device(tmp_path, capsys):
    """A profile checked on another machine still runs, with a warning naming both machines."""
    DeviceProfile(name="pi", threads=1, latency_model=_cover_digits_cnn(), profile_id="p1",
                  facts={"cpu_model": "Cortex-A76", "cores": 4, "isa_flags": ["asimddp", "neon"]}
                  ).save(tmp_path / "pi.json")
    assert main(["check-latency", "--device", "pi", "--devices-dir", str(tmp_path), "--workloads", "digits-cnn",
                 "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert "not the one 'pi' was calibrated on (CPU Cortex-A76 there" in err and "4 cores there" in err
    from edgeslim.objectives.devices import foreign_device

    here = _runner.device_facts(1)
    assert foreign_device(here, here) == "" and foreign_device({}, here) == ""


def test_calibrate_for_bad_targets(tmp_path, capsys):
    assert main(["calibrate", "--device", "x", "--devices-dir", str(tmp_path), "--for", "resnet99"]) == 2
    assert "resnet99" in capsys.readouterr().err
    assert main(["calibrate", "--fit", "m.json", "--device", "x", "--for", "digits-cnn",
                 "--devices-dir", str(tmp_path)]) == 2
    assert "--for" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_check_kit_round_trip_matches_the_local_check(tmp_path, capsys):
    """check-latency --kit writes what a remote device needs; its results come back through
    --measured with the same plans and predictions as a check measured here."""
    model = _cover_digits_cnn()
    then = [2 * t for t in _calibrate.measure_reference(1, tmp_path)]  # the device ~2x faster now
    DeviceProfile(name="cover", threads=1, latency_model=model, facts=_runner.device_facts(1), profile_id="c1",
                  extra={"reference": {"p50_ms": then}}).save(tmp_path / "cover.json")
    common = ["--device", "cover", "--devices-dir", str(tmp_path)]
    kit = tmp_path / "kit"
    assert main(["check-latency", *common, "--workloads", "digits-cnn", "--samples", "2", "--repeat",
                 "--kit", str(kit)]) == 0
    assert "--measured check.json" in capsys.readouterr().out  # the three steps
    manifest = json.loads((kit / "kit.json").read_text())
    assert manifest["purpose"] == "check" and manifest["device"] == "cover" and (kit / "run_kit.py").is_file()
    entries = manifest["entries"]
    # the reference kernels before each candidate and after the last, then each candidate again
    shape = "".join("r" if "reference" in e else ("R" if e.get("repeat") else "c") for e in entries)
    n_ref = len(_calibrate.REFERENCE_KERNELS)
    assert shape == ("r" * n_ref + "c") * 2 + "r" * n_ref + "RR"
    assert all((kit / e["file"]).is_file() for e in entries)
    # the same plans and predictions as check-latency measuring here with the same seed
    assert main(["check-latency", *common, "--workloads", "digits-cnn", "--samples", "2", "--format", "json"]) == 0
    local = json.loads(capsys.readouterr().out)["rows"]
    cands = manifest["candidates"]
    assert [c["plan"] for c in cands] == [r["plan"] for r in local]
    assert [c["predicted_ms"] for c in cands] == pytest.approx([r["predicted_ms"] for r in local], rel=1e-12)
    out = tmp_path / "check.json"
    assert _runner._kit_main([str(kit), "--out", str(out)]) == 0
    assert "--measured" in capsys.readouterr().out
    assert main(["check-latency", *common, "--measured", str(out), "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    rows = got["rows"]
    assert [r["plan"] for r in rows] == [c["plan"] for c in cands]
    assert [r["predicted_ms"] for r in rows] == pytest.approx([c["predicted_ms"] for c in cands], rel=1e-12)
    assert all(r["measured_p95_ms"] >= r["measured_ms"] > 0 and r["remeasured_ms"] > 0 for r in rows)
    assert all(0.3 < r["speed"] < 0.8 for r in rows)  # the reference timings around each candidate
    data = json.loads(out.read_text())
    timed = [e for e in data["entries"] if "candidate" in e]
    assert all(e["sessions"] == 3 and e["runs"] >= 3 * 10 for e in timed)  # CHECK_SESSIONS x min_runs
    # the table names the device the kit ran on
    assert main(["check-latency", *common, "--measured", str(out)]) == 0
    assert "by a check kit" in capsys.readouterr().out
    # measured on another machine: a warning naming both
    data["facts"] = {**data["facts"], "cpu_model": "Cortex-A76"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert main(["check-latency", *common, "--measured", str(other)]) == 0
    assert "CPU" in capsys.readouterr().err
    # bad input: one clear error each, exit 2, nothing overwritten
    before = (kit / "kit.json").read_text()
    assert main(["check-latency", *common, "--kit", str(kit)]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (kit / "kit.json").read_text() == before
    assert main(["calibrate", "--kit", str(kit)]) == 2
    assert (kit / "kit.json").read_text() == before
    assert main(["check-latency", *common, "--measured", str(out), "--samples", "3"]) == 2
    assert "--samples" in capsys.readouterr().err
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"kit_version": _runner.KIT_VERSION, "entries": []}))
    assert main(["check-latency", *common, "--measured", str(calib)]) == 2
    assert "calibration kit" in capsys.readouterr().err
    data["entries"] = [e for e in data["entries"] if e.get("candidate") != 1]
    other.write_text(json.dumps(data))
    assert main(["check-latency", *common, "--measured", str(other)]) == 2
    assert "lack candidates [1]" in capsys.readouterr().err
    assert main(["check-latency", *common, "--measured", str(tmp_path / "none.json")]) == 2
    assert main(["calibrate", "--fit", str(out), "--device", "x", "--devices-dir", str(tmp_path)]) == 2
    assert "check-latency --device cover --measured" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("truth", [0.0, 0.3, 1.0])
def test_tail_mix_is_recovered_from_measured_p95(truth):
    """A network's p95 combines its kernels' tails between their sum (slow runs coincide) and
    their root sum of squares (independent); fit_tail recovers the mix from p95/p50 ratios."""
    model = _cover_digits_cnn()
    rng = np.random.default_rng(3)
    types = ("conv_kxk@32", "conv_pw@8", "gemm@32", "pool@32", "gpool@32", "conv_kxk@4")
    nets = []
    for _ in range(8):
        ks = [_micro.random_kernel(types[int(rng.integers(len(types)))], rng)
              for _ in range(int(rng.integers(3, 12)))]
        per = model.predict_kernels(ks)
        over = model.overhead_ms(1000.0)
        tails = np.array([q - p for p, q in per] + [over * (model.overhead_p95_ratio_ - 1)])
        p50 = over + sum(p for p, _ in per)
        p95 = p50 + truth * tails.sum() + (1 - truth) * np.sqrt((tails ** 2).sum())
        nets.append((ks, p50, p95, 1000.0))
    assert model.fit_tail(nets).tail_mix_ == pytest.approx(truth, abs=1e-9)
    ks, p50, p95, io = nets[0]
    assert model.predict(ks, io) == pytest.approx((p50, p95), rel=1e-9)
    # the mix travels in the profile; one without it (written before it was fitted) adds every tail
    d = model.to_dict()
    assert LatencyModel.from_dict(d).predict(ks, io) == pytest.approx((p50, p95), rel=1e-9)
    del d["tail_mix"]
    old = LatencyModel.from_dict(d)
    summed = old.overhead_ms(io) * old.overhead_p95_ratio_ + sum(q for _, q in old.predict_kernels(ks))
    assert old.tail_mix_ == 1.0 and old.predict(ks, io)[1] == pytest.approx(summed, rel=1e-9)
    d["tail_mix"] = 1.5
    with pytest.raises(ValueError, match="tail_mix"):
        LatencyModel.from_dict(d)


def test_in_network_kernel_costs_are_fitted_with_their_sign():
    """Chains whose kernels each cost 3 us more inside a network than alone (what a lone micro-model
    hides in its per-inference overhead) and save 2 us per boundary: the fit finds both, the cost
    positive, and predictions with edges carry them; the profile form keeps them."""
    from edgeslim.objectives.devices._model import KERNEL_DOMAINS

    model, _ = _synthetic_model()
    chains = [(ks, edges, p50 + 0.003 * len(ks), io, lone) for ks, edges, p50, io, lone in _gemm_chains(model, 6, 1.0)]
    model.fit_boundaries(chains)
    f = KERNEL_DOMAINS.index("f")
    assert model.kernel_costs_[f] == pytest.approx(0.003, rel=0.1)
    assert model.boundaries_[2 * BOUNDARY_CLASSES.index("f>f")] == pytest.approx(0.002, rel=0.15)
    ks, edges, p50, _, _ = chains[0]
    assert model.predict(ks, 0, edges)[0] == pytest.approx(p50, rel=0.02)
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.kernel_costs_.tolist() == model.kernel_costs_.tolist()


def test_a_profile_from_an_older_edgeslim_is_refused_with_the_refit_command(tmp_path, capsys):
    """A profile whose model lacks the probed block and in-network costs: one line naming
    `calibrate --refit`, exit 2; the refit (from its stored measurements) makes it load again."""
    doc = json.loads((Path(__file__).resolve().parents[1] / "studies/devices/dev-vm-1t.json").read_text())
    doc["name"] = "old"
    for key in ("kernel_costs", "kernel_domains", "layout"):
        doc["model"].pop(key)
    (tmp_path / "old.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"older edgeslim .* `edgeslim calibrate --refit --device old`"):
        load_device("old", devices_dir=tmp_path)
    assert main(["check-latency", "--device", "old", "--devices-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "calibrate --refit --device old" in err and "Traceback" not in err
    assert main(["calibrate", "--refit", "--device", "old", "--devices-dir", str(tmp_path)]) == 0
    model = load_device("old", devices_dir=tmp_path).latency_model
    assert model is not None and model.layout.block == nchwc_block_of(doc["facts"])[0]


def test_structure_networks_are_exported_candidates_of_three_families(tmp_path):
    """Random networks for calibration: every family drawn, each under the size caps, exported as a
    candidate ships (runs in ONNX Runtime), its kernels and edges read off the realized module."""
    import onnxruntime as ort

    from edgeslim.search._structures import (_MAX_MACS, _MAX_WEIGHTS, STRUCTURE_FAMILIES, random_structure,
                                             structure_networks)

    rng = np.random.default_rng(3)
    families = set()
    for _ in range(12):
        family, model, x = random_structure(rng)
        families.add(family)
        ks, edges = extract_graph(model, x)
        assert sum(k.macs for k in ks) <= _MAX_MACS and sum(k.weight_elems for k in ks) <= _MAX_WEIGHTS
        assert all(0 <= a < b < len(ks) for a, b, _ in edges)
    assert families == set(STRUCTURE_FAMILIES)
    nets = structure_networks(2, tmp_path, seed=5)
    assert len(nets) == 2 and len({n["path"] for n in nets}) == 2
    for n in nets:
        sess = ort.InferenceSession(n["path"], providers=["CPUExecutionProvider"])
        shape = sess.get_inputs()[0].shape
        out = sess.run(None, {sess.get_inputs()[0].name: np.zeros(shape, np.float32)})[0]
        assert out.shape == (1, n["kernels"][-1].cout)
