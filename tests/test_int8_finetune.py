"""int8 fine-tuning keeps accuracy: the study's own short fine-tune recovers pruned int8 plans
as it recovers pruned fp32 ones (BatchNorm stays live in the quantized wrapper, folded at export)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.objectives import (FinetuneConfig, build_artifact, evaluate_accuracy, evaluate_onnx_accuracy,
                                 finetune_, sample_inputs)
from edgeslim.spaces import CompressionSpace, QuantizedLayer, dequantized_copy, layer_bits


def _finetuned(spec, workload, plan) -> float:
    return evaluate_accuracy(_finetuned_model(spec, workload, plan), workload.data)[0]


def _finetuned_model(spec, workload, plan) -> nn.Module:
    space = CompressionSpace.build(workload.model, workload.example_input, spec.space.rule_set())
    model = space.realize(workload.model, plan)
    ft = spec.finetune
    finetune_(model, workload.data, FinetuneConfig(steps=ft.steps, lr=ft.lr, batch_size=ft.batch_size), spec.seed)
    return model


def _mixed_plan(space: CompressionSpace, seed: int):
    """Per-group sparsity in {0, 0.25, 0.5}, two layers in three at int8, no low rank."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, dist in space.distributions().items():
        if key.endswith(".sparsity"):
            params[key] = float(rng.choice([c for c in dist.choices if c <= 0.5]))
        elif key.endswith(".bits"):
            params[key] = int(rng.choice([8, 8, 32])) if 8 in dist.choices else dist.choices[-1]
        else:
            params[key] = 1.0
    return space.plan_from_params(params)


@pytest.mark.slow
def test_uniform_int8_stays_within_one_point_of_dense(digits_resnet):
    spec, w = digits_resnet
    space = CompressionSpace.build(w.model, w.example_input, spec.space.rule_set())
    acc = _finetuned(spec, w, space.uniform_plan(bits=8))
    assert acc >= w.base_accuracy - 0.01, (acc, w.base_accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_pruned_int8_plans_recover(digits_resnet, seed):
    """Before BatchNorm stayed live these plans ended at 0.37-0.97 (seeds 2, 4, 5 below 0.7)."""
    spec, w = digits_resnet
    space = CompressionSpace.build(w.model, w.example_input, spec.space.rule_set())
    plan = _mixed_plan(space, seed)
    assert sum(lp.bits == 8 for _, lp in plan.layers) >= 8 and any(s > 0 for _, s in plan.groups)
    assert _finetuned(spec, w, plan) > 0.9


def test_batchnorm_moves_into_the_quantized_conv_and_folds_at_export():
    """The BN after an int8 conv runs inside its wrapper (live in train mode); the exported copy
    folds it with its running statistics and computes what the wrapper computes in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(4, 3, 10, 10)
    model(x)
    model.eval()
    space = CompressionSpace.build(model, x[:1])
    q = space.realize(model, space.uniform_plan(sparsity=0.25, bits=8))
    assert isinstance(q[0], QuantizedLayer) and isinstance(q[0].norm, nn.BatchNorm2d)
    assert isinstance(q[1], nn.Identity) and isinstance(q[4], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)  # the base is untouched
    q.train()
    before = q[0].norm.running_mean.clone()
    q(torch.randn(16, 3, 10, 10))
    assert not torch.equal(before, q[0].norm.running_mean)  # statistics are live while fine-tuning
    q.eval()
    plain = dequantized_copy(q)
    assert not any(isinstance(m, (nn.BatchNorm2d, QuantizedLayer)) for m in plain.modules())
    conv, qconv = plain[0], q[0]
    with torch.no_grad():
        xi = torch.randn(2, 3, 10, 10)
        want = qconv.norm(qconv.layer._conv_forward(xi, qconv.fake_weight(), qconv.layer.bias))
        assert torch.allclose(conv(xi), want, atol=1e-5)
        # per output channel the folded weights still sit on a symmetric int8 grid
        w = conv.weight.reshape(conv.weight.shape[0], -1)
        levels = w / (w.abs().amax(1, keepdim=True) / 127)
        assert torch.allclose(levels, levels.round(), atol=1e-3)


@pytest.mark.slow
def test_pruned_int8_artifact_agrees_with_the_finetuned_model(digits_resnet, tmp_path):
    """The exported artifact (BatchNorm folded after fine-tuning) predicts what torch predicts."""
    spec, w = digits_resnet
    space = CompressionSpace.build(w.model, w.example_input, spec.space.rule_set())
    model = _finetuned_model(spec, w, _mixed_plan(space, 1))
    calib = [t.numpy() for t in sample_inputs(w.data.train, 32)]
    path, got, _ = build_artifact(model, w.example_input, layer_bits(model), calib, tmp_path)
    assert sum(b == 8 for b in got.values()) >= 8
    onnx_acc, _, onnx_pred = evaluate_onnx_accuracy(path, w.data)
    xs, _ = w.data.val.tensors
    with torch.no_grad():
        torch_pred = model(xs).argmax(1).numpy()
    assert (torch_pred == onnx_pred).mean() >= 0.99 and onnx_acc > 0.9
