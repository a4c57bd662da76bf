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
from tests.helpers.cnn_toys import same, snapshot

X = torch.randn(4, 1, 28, 28)


def _chain() -> nn.Sequential:
    """Two groups of 4 channels ("0" and "2") with equal l2 scores in each."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(0.5)
    return model.eval()


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
    graph = find_channel_groups(_chain(), torch.randn(2, 1, 4, 4))
    assert [g.name for g in graph.groups] == ["0", "2"]
    result = pk.prune_channels(_chain(), [torch.randn(2, 1, 4, 4)], flops=0.3, budget="global", floor=0.25,
                               refine=None, recalibrate_bn=False, latency=_table(fast, slow))
    left = {r.owner: r.units_after for r in result.reports}
    assert left[fast] < 4 and left[slow] == 4


def test_the_table_has_every_group_no_time_at_full_width_and_leaves_the_model():
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    table = pk.measure_channel_latency(model, X, points=3, repeats=2, threads=1)
    graph = find_channel_groups(model, X)
    assert set(table.saved_ms) == {g.name for g in graph.groups} and table.batch == 4 and table.dense_ms > 0
    for g in graph.groups:
        saved = table.saved_ms[g.name]
        widths = sorted(saved, reverse=True)
        assert widths[0] == g.count and saved[g.count] == 0.0 and widths[-1] == 1
        assert all(saved[a] <= saved[b] for a, b in zip(widths, widths[1:]))  # narrower never costs more
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
    ({"flops": 0.3}, ValueError, "use it with budget='global' and flops= or params="),
    ({"ratio": 0.3, "budget": "global"}, ValueError, "use it with budget='global' and flops= or params="),
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
