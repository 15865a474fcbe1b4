"""Objectives: size oracle, energy formula, ONNX parity, latency protocol, conformance."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeslim.objectives import (
    OBJECTIVES, AccuracyObjective, Candidate, DeviceProfile, EnergyConstants, EnergyObjective, EvalContext,
    FinetuneConfig, LatencyObjective, SizeObjective, build_artifact, estimate_energy, export_onnx,
    measure_latency, model_size_bytes,
)
from edgeslim.spaces import CompressionSpace, LayerPlan, Plan, QuantizedLayer, layer_bits


def test_size_matches_hand_count():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), QuantizedLayer(nn.Conv2d(8, 6, 1), 4),
                      QuantizedLayer(nn.Linear(40, 6), 4), QuantizedLayer(nn.Linear(6, 5, bias=False), 8))
    conv = (8 * 3 * 9 + 8) * 4
    bn = (8 + 8 + 8 + 8) * 4  # weight, bias, running mean, running var (num_batches_tracked is an int)
    q4conv = math.ceil(48 * 4 / 8) + 6 * 4 + math.ceil(6 * 4 / 8) + 2 * 5 + 6 * 4  # w, scales, zero points, in/out act qparams, bias
    q4linear = 6 * 2 * (16 + 4) + 6 * 4  # 6 rows x 2 blocks of 32 (40 padded to 64): 16 packed bytes + fp32 scale; bias
    q8 = 30 + 5 * 4 + 5 + 2 * 5
    assert model_size_bytes(m) == conv + bn + q4conv + q4linear + q8


def test_size_shrinks_with_pruning_and_bits(tiny, example):
    space = CompressionSpace.build(tiny, example)
    dense = model_size_bytes(space.realize(tiny, space.dense_plan()))
    assert dense == sum(p.numel() * 4 for p in tiny.parameters()) + sum(
        b.numel() * 4 for b in tiny.buffers() if b.is_floating_point())
    int8 = model_size_bytes(space.realize(tiny, space.uniform_plan(bits=8)))
    pruned = model_size_bytes(space.realize(tiny, space.uniform_plan(sparsity=0.5)))
    assert int8 < dense / 3 and pruned < dense


def test_energy_formula_hand_count():
    c = EnergyConstants()
    lin = nn.Linear(4, 2)
    e = estimate_energy(lin, torch.zeros(1, 4), latency_ms=2.0, constants=c)
    assert e.compute_mj == pytest.approx(8 * 4.6e-9)
    moved = 10 * 4 + 4 * (4 + 2)  # fp32 weights+bias, input and output activations
    assert e.memory_mj == pytest.approx(moved * 162.5e-9)
    assert e.static_mj == pytest.approx(2.7 * 2.0)
    q = estimate_energy(QuantizedLayer(lin, 8), torch.zeros(1, 4), 2.0, c)
    assert q.compute_mj == pytest.approx(8 * 0.23e-9)
    assert q.memory_mj == pytest.approx((10 + 6) * 162.5e-9)


def test_exported_onnx_matches_torch(tiny, example):
    space = CompressionSpace.build(tiny, example)
    plan = Plan.from_dicts({"stem": 0.5, "conv1": 0.25}, {"conv1": LayerPlan(0.5, 32), "fc1": LayerPlan(0.25, 32)})
    model = space.realize(tiny, plan)
    path = export_onnx(model, example, _tmp_path() / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 8, 8)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(out, model(x).detach().numpy(), atol=1e-4)


def _tmp_path():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="edgeslim-test-"))


def test_quantized_artifact_runs_int8_and_int4(tiny, example, digits):
    space = CompressionSpace.build(tiny, example)
    plan = Plan.from_dicts({}, {"conv1": LayerPlan(1.0, 8), "fc1": LayerPlan(1.0, 4), "stem": LayerPlan(1.0, 32)})
    model = space.realize(tiny, plan)
    model.train()
    model(torch.randn(16, 1, 8, 8))
    model.eval()
    calib = [np.random.default_rng(i).standard_normal((1, 1, 8, 8)).astype(np.float32) for i in range(8)]
    path, got, _ = build_artifact(model, example, layer_bits(model), calib, _tmp_path())
    assert got["conv1"] == 8 and got["fc1"] == 4 and got["stem"] == 32
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 1, 8, 8)
    ref = model(x).detach().numpy()
    out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1].numpy()})[0] for i in range(4)])
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max() + 1e-3


def test_latency_protocol(tiny, example):
    path = export_onnx(tiny, example, _tmp_path() / "m.onnx")
    stats = measure_latency(path, (1, 1, 8, 8), threads=1, warmup=5, min_runs=30, max_runs=60, budget_s=0.05)
    assert 30 <= stats.runs <= 60 and 0 < stats.p50_ms <= stats.p95_ms and stats.threads == 1


def test_paired_latency_times_the_reference_in_the_same_pairs(tiny, example):
    from edgeslim.objectives._export import PAIRS

    d = _tmp_path()
    path, ref = export_onnx(tiny, example, d / "m.onnx"), export_onnx(nn.Conv2d(1, 2, 1), example, d / "r.onnx")
    alone = measure_latency(path, (1, 1, 8, 8), warmup=2, min_runs=30, max_runs=60, budget_s=0.03)
    assert alone.speedup is None and alone.reference_p50_ms is None
    stats = measure_latency(path, (1, 1, 8, 8), warmup=2, min_runs=30, max_runs=60, budget_s=0.03, reference=ref)
    assert stats.runs >= PAIRS * 10 and 0 < stats.p50_ms <= stats.p95_ms
    assert stats.speedup == pytest.approx(stats.reference_p50_ms / stats.p50_ms)
    low, high = stats.speedup_spread
    assert 0 < low <= high


def test_front_takes_the_paired_speedup():
    from edgeslim.search._front import _deltas

    base = {"latency_ms": 1.0, "size_bytes": 100}
    rec = {"latency_ms": 2.0, "size_bytes": 50, "latency_speedup_paired": 1.2, "latency_speedup_spread": [1.1, 1.3]}
    assert _deltas(rec, base) == {"size_reduction": 2.0, "latency_speedup": 1.2, "latency_speedup_spread": [1.1, 1.3]}
    assert _deltas({"latency_ms": 2.0}, base) == {"latency_speedup": 0.5}


def test_directions_come_from_objectives():
    assert {n: c.direction for n, c in OBJECTIVES.items()} == {
        "accuracy": "maximize", "size_bytes": "minimize", "latency_ms": "minimize", "energy_mj": "minimize"}
    assert EnergyObjective.estimated and EnergyObjective.requires == ("latency_ms",)


@pytest.fixture()
def ctx(digits, example):
    return EvalContext(data=digits, example_input=example, finetune=FinetuneConfig(steps=5, batch_size=32),
                       device=DeviceProfile.local(), workdir=_tmp_path(), seed=3)


def _candidate(tiny, example, plan=None):
    space = CompressionSpace.build(tiny, example)
    plan = plan or space.uniform_plan(sparsity=0.25, bits=8)
    return Candidate(plan, space.realize(tiny, plan))


@pytest.mark.parametrize("cls", [AccuracyObjective, SizeObjective, LatencyObjective, EnergyObjective])
def test_objective_conformance(cls, tiny, example, ctx):
    obj = cls()
    assert obj.direction in ("minimize", "maximize") and obj.name in OBJECTIVES
    values, needed = [], {}
    for _ in range(2):
        cand = _candidate(tiny, example)
        for need in obj.requires:  # measured once: energy must be a function of the same latency
            cand.metrics[need] = needed.setdefault(need, OBJECTIVES[need]().evaluate(cand, ctx))
        values.append(obj.evaluate(cand, ctx))
    assert all(math.isfinite(v) for v in values)
    if cls is AccuracyObjective:
        assert 0.0 <= values[0] <= 1.0 and values[0] == values[1]  # deterministic for a seed
        assert len(cand.metrics["per_class_accuracy"]) == 10
    elif cls is LatencyObjective:
        # the last evaluation's own p95 (the first one's p50 may sit in another speed state of a shared VM)
        assert values[1] > 0 and cand.metrics["latency_p95_ms"] >= values[1]
        assert "measured" in cand.metrics["latency_method"]
    else:
        assert values[0] == values[1]
    if cls is EnergyObjective:
        assert cand.metrics["energy_method"].startswith("estimate")


def test_int8_numerics_follow_the_probed_isa():
    assert DeviceProfile("vnni", facts={"machine": "x86_64", "isa_flags": ["avx2", "avx512_vnni"]}).int8_reduce_range is False
    assert DeviceProfile("avx2", facts={"machine": "x86_64", "isa_flags": ["avx2", "fma"]}).int8_reduce_range is True
    assert DeviceProfile("arm", facts={"machine": "aarch64", "isa_flags": ["asimddp"]}).int8_reduce_range is False
    old = DeviceProfile("old-x86", facts={"machine": "x86_64", "isa_flags": ["sse4_2"], "cpu_model": "Atom N270"})
    with pytest.warns(UserWarning, match="'old-x86' \\(Atom N270\\) has neither AVX2 nor VNNI.*--score artifact"):
        assert old.int8_reduce_range is True


def test_fine_tuning_runs_before_every_other_objective():
    """A spec listing latency before accuracy still scores the fine-tuned model's artifact."""
    from edgeslim.search import ordered_objectives

    assert [o.name for o in ordered_objectives(["energy_mj", "latency_ms", "size_bytes", "accuracy"])] == [
        "accuracy", "latency_ms", "size_bytes", "energy_mj"]


class _DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("dropout", [False, True])
def test_distilling_a_network_into_itself_moves_no_weight_unless_dropout_runs(dropout):
    from torch.utils.data import TensorDataset

    from edgeslim.objectives import DataSplits, FinetuneConfig, finetune_

    torch.manual_seed(0)
    model = _DropNet().eval()
    teacher = _DropNet().eval()
    teacher.load_state_dict(model.state_dict())
    ds = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(steps=6, lr=1e-2, batch_size=16, norm="frozen", dropout=dropout, distill=1.0)
    finetune_(model, DataSplits(ds, ds, 5), cfg, seed=0, teacher=teacher)
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # without dropout the student computes the teacher's logits bit for bit: the gradient is exactly
    # zero (Adam would blow rounding noise up to full-size steps); with dropout it learns
    assert unchanged is not dropout
