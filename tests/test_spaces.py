"""Spaces: inventory, pruning groups, low rank, fake quantization, plans, feasibility."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision
from torch import nn

from edgeslim.spaces import (
    CompressionSpace, InfeasiblePlanError, LayerPlan, LayerRule, Plan, QuantizedLayer, RuleSet,
    SpaceError, SpecError, factorize, inventory, quantize_weight, svd_pair,
)


def test_inventory_shapes_macs_params(tiny, example):
    layers = {l.name: l for l in inventory(tiny, example)}
    assert list(layers) == ["stem", "conv1", "conv2", "fc1", "fc2"]
    conv1 = layers["conv1"]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (8, 12, (3, 3))
    assert conv1.params == 12 * 8 * 9 + 12
    assert conv1.macs == 12 * 8 * 8 * (8 * 9)  # out elements × in-channels × kernel
    assert layers["fc2"].macs == 32 * 10 and layers["fc2"].out_shape == (1, 10)


def test_inventory_depthwise():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 6, 1))
    dw = inventory(m, torch.randn(1, 4, 5, 5))[0]
    assert dw.is_depthwise and dw.macs == 4 * 25 * 9 and dw.params == 4 * 9 + 4


def test_residual_coupling_shares_one_knob(tiny, example):
    space = CompressionSpace.build(tiny, example)
    groups = {g.name: g for g in space.groups}
    # stem's output is added to conv2's output: they must lose the same channels
    assert set(groups["stem"].members) == {"stem", "conv2"}
    assert "conv2.sparsity" not in space.distributions()
    assert "fc2" in space.excluded  # output layer


def test_pruned_model_has_expected_channels_and_base_is_untouched(tiny, example):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    space = CompressionSpace.build(tiny, example)
    plan = Plan.from_dicts({"stem": 0.5, "conv1": 0.25, "fc1": 0.5}, {})
    model = space.realize(tiny, plan)
    assert model.stem.out_channels == 4 and model.conv2.out_channels == 4
    assert model.conv1.out_channels == 9 and model.conv2.in_channels == 9
    assert model.fc1.out_features == 16 and model.fc2.in_features == 16
    assert model(example).shape == (1, 10)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(20, 12), torch.randn(3, 20)),
    (nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
    (nn.Conv1d(5, 7, 3, padding=1), torch.randn(2, 5, 11)),
])
def test_svd_full_rank_reproduces_outputs(layer, x):
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    pair = svd_pair(layer, full)
    assert torch.allclose(pair(x), layer(x), atol=1e-5)


def test_svd_truncation_matches_torch_linalg():
    lin = nn.Linear(30, 20)
    pair = svd_pair(lin, 5)
    u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    expected = (u[:, :5] * s[:5]) @ vh[:5]
    product = (pair[1].weight.double() @ pair[0].weight.double())
    assert torch.allclose(product, expected, atol=1e-5)


def test_factorize_skips_when_not_smaller():
    assert factorize(nn.Linear(4, 4), 0.75) is None  # 3*(4+4) = 24 >= 16
    assert factorize(nn.Conv2d(4, 4, 3, groups=2), 0.25) is None
    pair = factorize(nn.Conv2d(16, 32, 3), 0.25)
    assert [m.kernel_size for m in pair] == [(3, 3), (1, 1)] and pair[0].out_channels == 8  # ceil(0.25 * min(32, 16*9))


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_error_within_half_step(bits):
    w = torch.randn(16, 8, 3, 3)
    q = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / qmax
    assert torch.all((q - w).abs() <= scale / 2 + 1e-6)
    levels = torch.unique(torch.round(q / scale))
    assert levels.min() >= -qmax and levels.max() <= qmax


def test_fake_quant_straight_through_gradient():
    w = torch.randn(4, 3, requires_grad=True)
    quantize_weight(w, 8).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))


def test_quantized_layer_tracks_activation_range():
    q = QuantizedLayer(nn.Linear(3, 2), bits=8).train()
    q(torch.tensor([[-1.0, 0.5, 2.0]]))
    assert float(q.act_min) == -1.0 and float(q.act_max) == 2.0
    scale, zero = q.act_qparams()
    assert scale == pytest.approx(3.0 / 255) and zero == 85  # uint8: -1.0 maps to 0, 0.0 to 85


PLANS = [
    Plan(),
    Plan.from_dicts({"stem": 0.5}, {}),
    Plan.from_dicts({"conv1": 0.25, "fc1": 0.75}, {"fc1": LayerPlan(0.5, 4), "conv2": LayerPlan(1.0, 8)}),
]


@pytest.mark.parametrize("plan", PLANS)
def test_plan_json_round_trip(plan):
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert json.loads(text)["version"] == 1
    assert Plan.from_json(json.dumps(json.loads(text))).to_json() == text


def test_plan_from_other_version_is_rejected():
    with pytest.raises(InfeasiblePlanError, match="schema version"):
        Plan.from_dict({"version": 99, "groups": {}, "layers": {}})


@pytest.mark.parametrize("plan,match", [
    (Plan.from_dicts({"nope": 0.5}, {}), "unknown group 'nope'"),
    (Plan.from_dicts({"stem": 1.0}, {}), "must be in \\[0, 1\\)"),
    (Plan.from_dicts({}, {"fc1": LayerPlan(0.0, 32)}), "rank ratio of 'fc1'"),
    (Plan.from_dicts({}, {"fc1": LayerPlan(1.0, 16)}), "bits of 'fc1'"),
    (Plan.from_dicts({}, {"ghost": LayerPlan()}), "unknown layer 'ghost'"),
])
def test_infeasible_plans_raise_before_running(tiny, example, plan, match):
    space = CompressionSpace.build(tiny, example)
    with pytest.raises(InfeasiblePlanError, match=match):
        space.realize(tiny, plan)


def test_pruning_keeps_at_least_one_channel_and_rejects_all():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    space = CompressionSpace.build(m, torch.randn(1, 1, 8, 8))
    assert space.realize(m, Plan.from_dicts({"0": 0.99}, {}))[0].out_channels == 1
    with pytest.raises(InfeasiblePlanError, match="would remove every channel"):
        space.check(Plan.from_dicts({"0": 1.0}, {}))


def test_everything_frozen_is_an_impossible_space(tiny, example):
    with pytest.raises(SpaceError, match="nothing to search"):
        CompressionSpace.build(tiny, example, RuleSet.from_mapping({"_default": LayerRule(freeze=True)}))


def test_rules_precedence_exact_then_regex_then_default():
    rules = RuleSet.from_mapping({
        "_default": LayerRule(bits=(4, 8, 32)),
        "re:fc.*": LayerRule(bits=(8, 32)),
        "fc2": LayerRule(freeze=True),
    })
    assert rules.resolve("fc2").freeze
    assert rules.resolve("fc1").bits == (8, 32) and not rules.resolve("fc1").freeze
    assert rules.resolve("conv1").bits == (4, 8, 32)


@pytest.mark.parametrize("rule,match", [
    (dict(sparsity=(1.0,)), "sparsity must be in"),
    (dict(rank=(0.0,)), "rank ratio must be in"),
    (dict(bits=(16,)), "bits must be a non-empty subset"),
])
def test_bad_rule_values(rule, match):
    with pytest.raises(SpaceError, match=match):
        LayerRule(**rule)


def test_rule_for_unknown_layer_is_rejected(tiny, example):
    with pytest.raises(SpaceError, match="rules name layers the model does not have"):
        CompressionSpace.build(tiny, example, RuleSet.from_mapping({"conv9": LayerRule(freeze=True)}))


def test_knob_names_and_plan_from_params(tiny, example):
    space = CompressionSpace.build(tiny, example)
    dists = space.distributions()
    assert {"stem.sparsity", "conv1.rank", "fc1.bits"} <= set(dists)
    plan = space.plan_from_params({"stem.sparsity": 0.5, "fc1.bits": 4, "conv1.rank": 0.5})
    assert plan.sparsity_of("stem") == 0.5 and plan.layer("fc1").bits == 4 and plan.layer("conv1").rank == 0.5
    assert space.plan_from_params(space.params_of(plan)) == plan


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_realize(name):
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    space = CompressionSpace.build(m, x)
    assert len(space.groups) > 5
    plan = space.uniform_plan(sparsity=0.5, rank=0.5, bits=8)
    assert plan.groups and any(lp.rank < 1 for _, lp in plan.layers)
    out = space.realize(m, plan)(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_channel_multiple_rounds_kept_channels_to_the_block():
    from edgeslim.search import DigitsResNet

    torch.manual_seed(0)
    model, x = DigitsResNet().eval(), torch.randn(1, 1, 32, 32)
    space = CompressionSpace.build(model, x, channel_multiple=16)
    for sparsity in (0.25, 0.5, 0.75):
        pruned = space.realize(model, space.uniform_plan(sparsity=sparsity))
        widths = {m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)}
        assert all(w % 16 == 0 for w in widths), (sparsity, widths)
        assert pruned(x).shape == (1, 10)
    # choices that keep the same count merge (a group of one block, 16 channels, is not pruned at all)
    knobs = {k.target: k.choices for k in space.knobs if k.param_name.endswith(".sparsity")}
    assert all(len(set(choices)) == len(choices) for choices in knobs.values())
    plain = CompressionSpace.build(model, x)
    assert plain.channel_multiple == 1
    widths = {m.out_channels for m in plain.realize(model, plain.uniform_plan(sparsity=0.25)).modules()
              if isinstance(m, nn.Conv2d)}
    assert 12 in widths  # without rounding 25 % of 16 channels go


def test_channel_multiple_in_the_spec():
    from edgeslim.search import demo_spec
    from edgeslim.search._spec import SpaceSpec, spec_fingerprint

    assert "channel_multiple" not in spec_fingerprint(demo_spec())  # old studies still resume
    spec = demo_spec().replace(space=dataclasses.replace(demo_spec().space, channel_multiple=0))
    assert '"channel_multiple": 0' in spec_fingerprint(spec)
    with pytest.raises(SpecError, match="channel_multiple must be >= 0, got -1"):
        demo_spec().replace(space=SpaceSpec(channel_multiple=-1))


def _constant_unit_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # unit 0 has the largest weights but always outputs 5: no information
        m[0].weight[0] = 3.0
        m[0].weight[0, 1:] = 0.0
        m[0].bias[0] = 5.0
        m[0].bias[1:] = 10.0  # the others never clip at zero: each carries information
        m[2].weight[:, 0] = 1.0
    return m.eval()


def test_activation_pruning_removes_a_constant_unit_without_changing_outputs():
    m = _constant_unit_mlp()
    x = torch.randn(64, 4)
    x[:, 0] = 0.0  # unit 0 reads input 0 only, so it is the constant 5 on these inputs
    aware = CompressionSpace.build(m, x[:1], calibration=x)
    plain = CompressionSpace.build(m, x[:1])
    plan = Plan.from_dicts({"0": 0.125}, {})  # one of the eight hidden units
    pruned = aware.realize(m, plan)
    assert pruned[0].out_features == 7 and pruned[2].in_features == 7
    # the constant unit goes (its removal changes nothing once its mean moves into the bias)
    torch.testing.assert_close(pruned(x), m(x), atol=1e-5, rtol=0)
    # magnitude pruning keeps it (largest weights) and removes an informative unit instead
    assert (plain.realize(m, plan)(x) - m(x)).abs().max() > 1e-2


def test_activation_pruning_keeps_the_next_layers_mean_output():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, bias=False),
                      nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4)).eval()
    x = torch.randn(32, 3, 6, 6)
    space = CompressionSpace.build(m, x[:1], calibration=x)
    pruned = space.realize(m, Plan.from_dicts({"0": 0.5}, {}))
    assert pruned[2].in_channels == 4 and pruned[2].bias is not None  # the compensation's bias
    with torch.no_grad():  # the conv is linear: its mean output over the batch is kept exactly,
        before, after = m[:3](x), pruned[:3](x)  # zero padding included
    torch.testing.assert_close(after.mean((0, 2, 3)), before.mean((0, 2, 3)), atol=1e-5, rtol=0)
    assert m[2].bias is None  # the base model is never modified


def test_calibration_batch_must_match_the_example_input():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(SpaceError, match=r"calibration batch shape \(16, 5\)"):
        CompressionSpace.build(m, torch.zeros(1, 4), calibration=torch.zeros(16, 5))


def test_pruning_criterion_in_the_spec_and_the_study(digits_cnn):
    import optuna

    from edgeslim.search import demo_spec
    from edgeslim.search._spec import SpaceSpec, spec_fingerprint
    from edgeslim.search._study import spec_device, spec_objective

    spec = demo_spec()
    assert spec.space.pruning == "activation"
    assert "pruning" not in spec_fingerprint(spec)  # studies from before the option still resume
    with pytest.raises(SpecError, match="pruning must be one of .* got 'l2'"):
        spec.replace(space=SpaceSpec(pruning="l2"))
    profile = spec_device(spec)
    fresh = spec_objective(spec, digits_cnn, profile)
    assert fresh.pruning == "activation" and fresh.space.calibration.shape[0] == 64
    study = optuna.create_study(directions=fresh.directions)
    fresh.enqueue_baselines(study)
    assert study.user_attrs["pruning"] == "activation"
    # a study searched before the option (no "pruning" attribute) realizes its plans as it was searched
    old = optuna.create_study(directions=fresh.directions)
    old.set_user_attr("base_model_hash", digits_cnn.model_hash)
    assert spec_objective(spec, digits_cnn, profile, old).space.calibration is None
    magnitude = spec_objective(spec.replace(space=dataclasses.replace(spec.space, pruning="magnitude")),
                               digits_cnn, profile)
    with pytest.raises(SpecError, match="chose pruned channels by 'activation'.*pass pruning='activation'"):
        magnitude.enqueue_baselines(study)

