"""measure_channel_latency's table and prune_channels(latency=...): the ranking by accuracy cost per
millisecond is checked with hand-made tables (timings themselves are not asserted: they depend on
the machine), the measurement for shape, monotonicity and leaving the model alone."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.channel_budget import macs
from prunekit.structures.channel_latency import ChannelLatency, narrowed
from prunekit.structures.channels_graph import find_channel_groups
from prunekit.zoo.models import resnet_mnist
from prunekit.zoo.vit import vit_mnist
from tests.helpers.cnn_toys import assert_width_table, same, snapshot, two_groups

X = torch.randn(4, 1, 28, 28)


def _table(fast: str, slow: str) -> ChannelLatency:
    """Removing channels of ``fast`` saves 1 ms each, of ``slow`` 0.01 ms each."""
    return ChannelLatency(10.0, {fast: {w: 1.0 * (4 - w) for w in range(1, 5)},
                                 slow: {w: 0.01 * (4 - w) for w in range(1, 5)}}, batch=4)


def test_saved_interpolates_between_measured_widths():
    table = ChannelLatency(5.0, {"g": {8: 0.0, 4: 2.0, 1: 3.5}})
    assert table.saved("g", 8) == 0.0 and table.saved("g", 6) == 1.0 and table.saved("g", 4) == 2.0
    assert table.saved("g", 2) == pytest.approx(3.0) and table.saved("g", 1) == 3.5 and table.saved("g", 0) == 3.5


@pytest.mark.parametrize("fast,slow", [("0", "2"), ("2", "0")])
def test_equal_scores_go_where_they_save_the_most_time(fast, slow):
    graph = find_channel_groups(two_groups(), torch.randn(2, 1, 4, 4))
    assert [g.name for g in graph.groups] == ["0", "2"]
    result = pk.prune_channels(two_groups(), [torch.randn(2, 1, 4, 4)], flops=0.3, budget="global", floor=0.25,
                               refine=None, recalibrate_bn=False, latency=_table(fast, slow))
    left = {r.owner: r.units_after for r in result.reports}
    assert left[fast] < 4 and left[slow] == 4


def test_the_table_has_every_group_no_time_at_full_width_and_leaves_the_model():
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    table = pk.measure_channel_latency(model, X, points=3, repeats=2, threads=1)
    graph = find_channel_groups(model, X)
    assert table.batch == 4 and table.dense_ms > 0
    assert_width_table(table.saved_ms, graph)
    assert same(model, snap) and not model.training


def test_a_narrowed_copy_changes_one_group_only():
    model = vit_mnist(dim=16, depth=1, heads=4, mlp=24).eval()
    graph = find_channel_groups(model, X)
    copy = narrowed(model, graph, 0, 2)  # the heads group
    assert copy[1].attn.num_heads == 2 and model[1].attn.num_heads == 4
    assert copy(X).shape == (4, 10)
    assert macs(graph, [2, 0]) < macs(graph)


def test_a_latency_ranked_prune_meets_the_flops_target():
    model = resnet_mnist(width=4).eval()
    table = pk.measure_channel_latency(model, X, points=2, repeats=1)
    result = pk.prune_channels(model, [X], flops=0.4, budget="global", score="l2", refine=None,
                               recalibrate_bn=False, latency=table)
    assert result.flops_removed >= 0.4 and model(X).shape == (4, 10)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"flops": 0.3, "latency": "fast"}, TypeError, "latency must be a table from pk.measure_channel_latency"),
    ({"flops": 0.3}, ValueError, "use it with budget='global' and flops=, params= or speedup="),
    ({"ratio": 0.3, "budget": "global"}, ValueError, "use it with budget='global' and flops=, params= or speedup="),
    ({"flops": 0.3, "budget": "global", "latency": ChannelLatency(1.0, {"x": {1: 0.0}})}, ValueError,
     "the table's channel groups are not this model's"),
])
def test_bad_latency_use_is_refused_and_the_model_unchanged(kwargs, error, match):
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    kwargs.setdefault("latency", ChannelLatency(1.0, {}))
    with pytest.raises(error, match=match):
        pk.prune_channels(model, [X], **kwargs)
    assert same(model, snap)


@pytest.mark.parametrize("kwargs,match", [({"points": 1}, "points must be"), ({"repeats": 0}, "repeats must be")])
def test_bad_measurement_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.measure_channel_latency(resnet_mnist(width=4).eval(), X, **kwargs)


def test_a_step_that_saves_little_before_one_that_saves_much_is_pooled_with_it():
    """Kernels save time in jumps: 4 -> 3 channels saves nothing, 3 -> 2 saves 2 ms. The group's
    steps must still go in order, so the first is ranked by the two steps' pooled cost per ms."""
    from prunekit.structures.allocate import Step
    from prunekit.structures.channel_budget import _per_millisecond
    graph = find_channel_groups(two_groups(), torch.randn(2, 1, 4, 4))
    table = ChannelLatency(10.0, {"0": {4: 0.0, 3: 0.0, 2: 2.0, 1: 3.0}, "2": {w: 1.0 * (4 - w) for w in range(1, 5)}})
    ranked = [Step(1.0, 0, 0, 1), Step(1.0, 0, 1, 1), Step(1.0, 0, 2, 1),
              Step(1.0, 1, 0, 1), Step(2.0, 1, 1, 1), Step(3.0, 1, 2, 1)]
    out = {(st.site, st.index): st.score for st in _per_millisecond(graph, ranked, table)}
    mean = (3.0 + 3.0) / 6  # ms saved per channel over all steps
    assert out[(0, 0)] == out[(0, 1)] == pytest.approx((1.0 + 1.0) / 2.0 * mean)  # pooled: 2 of cost over 2 ms
    assert out[(0, 2)] == pytest.approx(1.0 / 1.0 * mean)
    assert [out[(1, i)] for i in range(3)] == pytest.approx([1.0 * mean, 2.0 * mean, 3.0 * mean])  # rising: unpooled


def test_a_speedup_target_takes_the_time_from_where_it_is_cheapest():
    """Equal scores; group "0" saves 1 ms a channel of a 10 ms forward, "2" 0.01: x1.25 needs 2 ms,
    which two channels of "0" give; the prediction is what the table says."""
    model = two_groups()
    result = pk.prune_channels(model, [torch.randn(2, 1, 4, 4)], speedup=1.25, budget="global", floor=0.25,
                               refine=None, recalibrate_bn=False, latency=_table("0", "2"))
    left = {r.owner: r.units_after for r in result.reports}
    assert left == {"0": 2, "2": 4}
    assert result.predicted_speedup == pytest.approx(10.0 / 8.0)
    assert "predicts x1.25" in result.summary()


def test_a_speedup_target_and_a_flops_target_are_both_met():
    model = two_groups()
    graph = find_channel_groups(model, torch.randn(2, 1, 4, 4))
    result = pk.prune_channels(model, [torch.randn(2, 1, 4, 4)], speedup=1.12, flops=0.5, budget="global",
                               floor=0.25, refine=None, recalibrate_bn=False, latency=_table("0", "2"))
    left = {r.owner: r.units_after for r in result.reports}
    assert result.predicted_speedup >= 1.12 and result.flops_removed >= 0.5
    assert left["0"] <= 3  # x1.12 needs the fast group; the FLOPs took the rest by score
    assert macs(graph, [4 - left["0"], 4 - left["2"]]) == result.macs_after


@pytest.mark.parametrize("kwargs,match", [
    ({"speedup": 1.0}, "speedup must be a number > 1"),
    ({"speedup": True}, "speedup must be a number > 1"),
    ({"speedup": "2"}, "speedup must be a number > 1"),
    ({"speedup": float("nan")}, "speedup must be a number > 1"),
    ({"speedup": 1.5, "latency": None}, "pass latency=pk.measure_channel_latency"),
    ({"speedup": 1.5, "budget": "uniform"}, "use it with budget='global'"),
    ({"speedup": 50.0}, "speedup=50 cannot be reached: the latency table predicts at most x"),
])
def test_bad_speedup_targets_are_refused_and_the_model_unchanged(kwargs, match):
    model = two_groups()
    snap = snapshot(model)
    kwargs = {"budget": "global", "latency": _table("0", "2"), **kwargs}
    with pytest.raises(ValueError, match=match):
        pk.prune_channels(model, [torch.randn(2, 1, 4, 4)], refine=None, recalibrate_bn=False, **kwargs)
    assert same(model, snap)


@pytest.mark.parametrize("target", [{"speedup": 1.1}, {"flops": 0.2}])
def test_a_latency_ranking_keeps_multiples_of_multiple_of(target):
    """18 channels, multiple_of=8: the steps are 18 -> 16 (2 channels, no time saved) and 16 -> 8
    (8 channels, 5 ms); taken out of order they would leave 10 channels (as they did before the
    steps were pooled)."""
    model = nn.Sequential(nn.Conv2d(1, 18, 1, bias=False), nn.ReLU(), nn.Conv2d(18, 8, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 2, 1)).eval()
    table = ChannelLatency(10.0, {"0": {18: 0.0, 16: 0.0, 12: 4.0, 8: 5.0, 1: 6.0},
                                  "2": {8: 0.0, 4: 0.01, 1: 0.02}})
    result = pk.prune_channels(model, [torch.randn(2, 1, 4, 4)], **target, budget="global", multiple_of=8,
                               refine=None, recalibrate_bn=False, latency=table)
    left = {r.owner: r.units_after for r in result.reports}
    assert left == {"0": 8, "2": 8} and result.predicted_speedup == pytest.approx(2.0)
