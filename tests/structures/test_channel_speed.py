"""prune_channels_to_speedup: the loop that raises the latency table's goal by each measured
shortfall. Measurements are replaced by fakes (timings are not asserted: they depend on the
machine); the oracle for the pruned model is a direct prune_channels call with the final goal."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures import channel_speed
from prunekit.structures.channel_latency import ChannelLatency
from tests.helpers.cnn_toys import same, snapshot

X = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def _chain() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 2, 1))
    torch.manual_seed(0)
    for m in model:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight)
    return model.eval()


#: every channel of either group saves 0.5 ms of a 10 ms forward
TABLE = ChannelLatency(10.0, {g: {w: 0.5 * (8 - w) for w in range(1, 9)} for g in ("0", "2")}, batch=2)


def _fake(factor: float, seen: list):
    """A measurement that gives ``factor`` times the table's prediction for the pruned copy."""
    def measured(dense, pruned, x, repeats, threads):
        kept = {"0": pruned[0].out_channels, "2": pruned[2].out_channels}
        seen.append((TABLE.predicted_speedup(kept), copy.deepcopy(pruned)))
        return factor * TABLE.predicted_speedup(kept)
    return measured


def test_a_shortfall_raises_the_goal_until_measured_and_the_model_is_pruned_once_like_the_last_copy(monkeypatch):
    seen: list = []
    monkeypatch.setattr(channel_speed, "_measured", _fake(0.9, seen))
    model = _chain()
    result = pk.prune_channels_to_speedup(model, [X], X, speedup=1.3, latency=TABLE, score="l2", refine=None,
                                          recalibrate_bn=False)
    predictions = [p for p, _ in seen]
    assert len(seen) >= 2 and predictions[0] >= 1.3 and 0.9 * predictions[0] < 1.3  # the first copy fell short
    passing = [(p, m) for p, m in seen if 0.9 * p >= 1.3]
    p, kept = min(passing, key=lambda pm: pm[0])  # the least-pruned copy that measured enough
    assert result.predicted_speedup == pytest.approx(p) and result.measured_speedup == pytest.approx(0.9 * p)
    sa, sb = model.state_dict(), kept.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "measured: x" in result.summary()


def test_an_overshoot_lowers_the_goal_so_that_fewer_channels_go(monkeypatch):
    """Measured 1.5x the prediction: the first copy is faster than asked, and a lower goal that
    still measures enough keeps more channels."""
    seen: list = []
    monkeypatch.setattr(channel_speed, "_measured", _fake(1.5, seen))
    model = _chain()
    result = pk.prune_channels_to_speedup(model, [X], X, speedup=1.3, latency=TABLE, refine=None, recalibrate_bn=False)
    first = seen[0][1]
    assert len(seen) >= 2 and result.measured_speedup >= 1.3
    assert model[0].out_channels + model[2].out_channels > first[0].out_channels + first[2].out_channels


def test_a_first_measurement_at_the_goal_prunes_as_prune_channels_would(monkeypatch):
    monkeypatch.setattr(channel_speed, "_measured", _fake(1.0, []))
    model, direct = _chain(), _chain()
    result = pk.prune_channels_to_speedup(model, [X], X, speedup=1.2, latency=TABLE, refine=None, recalibrate_bn=False)
    pk.prune_channels(direct, [X], budget="global", speedup=1.2, latency=TABLE, refine=None, recalibrate_bn=False)
    assert same(model, snapshot(direct)) and result.measured_speedup >= 1.2


@pytest.mark.parametrize("factor,tries,match", [(0.9, 1, r"speedup=1.3 was not measured in 1 try \(measured x1.20\)"),
                                                (0.5, 3, "measured x0.67; asking the latency table for x2.60 .* beyond")])
def test_a_speedup_never_measured_is_refused_and_the_model_unchanged(monkeypatch, factor, tries, match):
    monkeypatch.setattr(channel_speed, "_measured", _fake(factor, []))
    model = _chain()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pk.prune_channels_to_speedup(model, [X], X, speedup=1.3, tries=tries, latency=TABLE, refine=None,
                                     recalibrate_bn=False)
    assert same(model, snap)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"speedup": 1.0}, ValueError, "speedup must be a number > 1"),
    ({"speedup": True}, ValueError, "speedup must be a number > 1"),
    ({"speedup": 1.5, "tries": 0}, ValueError, "tries must be a whole number >= 1"),
    ({"speedup": 1.5, "repeats": 1.5}, ValueError, "repeats must be a whole number >= 1"),
    ({"speedup": 1.5, "budget": "uniform"}, TypeError, "sets budget itself"),
])
def test_bad_options_are_named_and_the_model_unchanged(kwargs, error, match):
    model = _chain()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        pk.prune_channels_to_speedup(model, [X], X, latency=TABLE, **kwargs)
    assert same(model, snap)


def test_it_measures_a_table_when_given_none():
    """The real measurement, on a tiny model: only that it runs and leaves a working model or refuses
    (a tiny model may never be measured faster) with the model unchanged."""
    model = _chain()
    snap = snapshot(model)
    try:
        result = pk.prune_channels_to_speedup(model, [X], X, speedup=1.01, tries=1, repeats=2, refine=None,
                                              recalibrate_bn=False)
    except ValueError as e:
        assert "speedup=1.01" in str(e) and same(model, snap)
    else:
        assert result.measured_speedup >= 1.01 and model(X).shape == (2, 2, 4, 4)


def test_the_next_goal_stays_between_what_fell_short_and_what_measured_enough():
    assert channel_speed._next_goal(1.5, None, None) == 1.5
    assert channel_speed._next_goal(1.3, 1.2, 1.6) == 1.3  # inside the bracket: the correction
    assert channel_speed._next_goal(2.0, 1.2, 1.6) == pytest.approx(1.4)  # outside: the midpoint
    assert channel_speed._next_goal(1.1, 1.2, None) == pytest.approx(1.212)  # below a shortfall: a little above it
    assert channel_speed._next_goal(0.5, None, None) > 1.0  # a goal is always a speed-up
