"""measure_channel_sensitivity's table and prune_channels(sensitivity=...): the measurement against
hand-computed output errors (a dead channel costs nothing; a masked one costs exactly its share of
the output), the ranking with hand-made tables, and bad input refused with the model unchanged."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.channel_latency import ChannelLatency
from prunekit.structures.channel_sensitivity import ChannelSensitivity, _output
from prunekit.structures.channels_graph import find_channel_groups
from prunekit.zoo.models import resnet_mnist
from prunekit.zoo.vit import vit_mnist
from tests.helpers.cnn_toys import ConcatSE, assert_width_table, same, snapshot, two_groups

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_a_dead_channel_costs_nothing_and_a_live_one_its_share_of_the_output():
    """Channels 2, 3 of the first group are written by zero filters: removing them changes nothing.
    Unrefit (masked), removing one of four equal live channels of the second group removes a
    quarter of the output's signal: the error is ``sum((y/4)^2) / sum((y - mean)^2)``."""
    model = two_groups()
    with torch.no_grad():
        model[0].weight[2:] = 0
        model[4].weight.fill_(1.0)  # the output sums the four equal channels of the second group
    x = torch.rand(4, 1, 3, 3) + 0.5
    table = pk.measure_channel_sensitivity(model, [x], refine=None, points=4)
    assert table.cost("0", 2) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        y = model(x).double()
        bias = model[4].bias.double().view(1, -1, 1, 1)
        expected = float(((y - bias) / 4).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert table.cost("2", 3) == pytest.approx(expected, rel=1e-5)  # float32 forward, float64 sums


def test_the_table_has_every_group_no_error_at_full_width_rises_and_leaves_the_model():
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    table = pk.measure_channel_sensitivity(model, [X], points=3, score="obs")
    graph = find_channel_groups(model, X)
    assert table.batches == 1 and table.score == "obs"
    assert_width_table(table.error, graph)
    assert same(model, snap) and not model.training


def test_heads_and_concatenations_are_measured_too():
    vit = vit_mnist(dim=16, depth=1, heads=4, mlp=24).eval()
    table = pk.measure_channel_sensitivity(vit, [X], points=2)
    assert len(table.error) == 2 and isinstance(vit[1].attn, nn.MultiheadAttention)  # not swapped in the user's
    se = ConcatSE().eval()
    assert set(pk.measure_channel_sensitivity(se, [X], points=2).error) == {
        g.name for g in find_channel_groups(se, X).groups}


@pytest.mark.parametrize("cheap,dear", [("0", "2"), ("2", "0")])
def test_channels_go_where_the_table_says_they_cost_least(cheap, dear):
    table = ChannelSensitivity({cheap: {4: 0.0, 3: 0.001, 2: 0.002, 1: 0.003}, dear: {4: 0.0, 3: 1.0, 2: 2.0, 1: 3.0}})
    result = pk.prune_channels(two_groups(), [torch.randn(2, 1, 4, 4)], flops=0.3, budget="global", floor=0.25,
                               refine=None, recalibrate_bn=False, sensitivity=table)
    left = {r.owner: r.units_after for r in result.reports}
    assert left[cheap] < 4 and left[dear] == 4


def test_with_a_latency_table_it_is_error_per_millisecond():
    """Group "0" costs twice the error per channel but saves ten times the time: it goes first."""
    sens = ChannelSensitivity({"0": {w: 0.2 * (4 - w) for w in range(1, 5)}, "2": {w: 0.1 * (4 - w) for w in range(1, 5)}})
    lat = ChannelLatency(10.0, {"0": {w: 1.0 * (4 - w) for w in range(1, 5)}, "2": {w: 0.1 * (4 - w) for w in range(1, 5)}})
    result = pk.prune_channels(two_groups(), [torch.randn(2, 1, 4, 4)], speedup=1.1, budget="global", refine=None,
                               recalibrate_bn=False, sensitivity=sens, latency=lat)
    assert {r.owner: r.units_after for r in result.reports} == {"0": 3, "2": 4}


def test_output_picks_the_tensor_to_compare():
    t = torch.ones(2)
    assert _output(t) is t and _output((t, 3)) is t and _output({"logits": t, "x": 0}) is t and _output({"a": t}) is t
    with pytest.raises(TypeError, match="compares the model's output tensors"):
        _output("text")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"flops": 0.3, "budget": "global", "sensitivity": {"0": {}}}, TypeError, "sensitivity must be a table"),
    ({"flops": 0.3}, ValueError, "sensitivity= ranks channels across groups"),
    ({"ratio": 0.3, "budget": "global"}, ValueError, "sensitivity= ranks channels across groups"),
    ({"flops": 0.3, "budget": "global", "sensitivity": ChannelSensitivity({"x": {1: 0.0}})}, ValueError,
     "sensitivity: the table's channel groups are not this model's"),
])
def test_bad_sensitivity_use_is_refused_and_the_model_unchanged(kwargs, error, match):
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    kwargs.setdefault("sensitivity", ChannelSensitivity({}))
    with pytest.raises(error, match=match):
        pk.prune_channels(model, [X], **kwargs)
    assert same(model, snap)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"points": 1}, ValueError, "points must be"), ({"score": "taylor"}, ValueError, "score must be one of"),
    ({"refine": "snows"}, ValueError, "refine must be 'lstsq' or None"),
    ({"calibration": []}, ValueError, "calibration is empty"),
    ({"calibration": X}, TypeError, "wrap a single batch in a list"),
])
def test_bad_measurement_options_are_named(kwargs, error, match):
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    calibration = kwargs.pop("calibration", [X])
    with pytest.raises(error, match=match):
        pk.measure_channel_sensitivity(model, calibration, **kwargs)
    assert same(model, snap)
