"""structures='channels' in a StructuredConfig: checked before any model is seen, and given to
prune_channels as the same keywords a direct call takes (the oracle: that direct call)."""
import copy

import pytest
import torch

import prunekit as pk
from prunekit.structures.channel_options import channel_kwargs
from prunekit.structures.config import StructuredConfig
from prunekit.zoo.models import small_cnn

CALIB = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.parametrize("options,error,match", [
    ({"structures": "channels"}, ValueError, r"^give exactly one of ratio= .*, flops= .* for structures=channels \(or "),
    ({"structures": "channels", "flops": 0.5, "rank_by": "fast", "budget": "global"}, ValueError,
     "^rank_by must be one of 'score', 'latency', 'sensitivity', 'sensitivity\\+latency' for structures=channels"),
    ({"structures": "channels", "flops": 0.5, "rank_by": "latency"}, ValueError,
     "^rank_by and speedup rank channels across groups: set budget=global"),
    ({"structures": "channels", "speedup": 1.5}, ValueError, "^rank_by and speedup .* set budget=global"),
    ({"structures": "channels", "speedup": 1.0, "budget": "global"}, ValueError, "^speedup must be a number > 1"),
    ({"structures": "channels", "ratio": 0.5, "rank_by": "sensitivity", "budget": "global"}, ValueError,
     "^rank_by applies to flops=, params= or speedup= targets, not ratio="),
    ({"structures": "mlp", "ratio": 0.5, "rank_by": "latency"}, ValueError, "^rank_by applies to structures=channels"),
    ({"structures": "mlp", "ratio": 0.5, "speedup": 2.0}, ValueError, "^speedup applies to structures=channels"),
    ({"structures": "channels,mlp", "ratio": 0.5}, ValueError, "^structures 'channels' .* does not combine with mlp"),
    ({"structures": "channels", "ratio": 1.5}, ValueError, r"^ratio must be a number in \(0, 1\)"),
    ({"structures": "channels", "ratio": 0.5, "method": "flap"}, ValueError,
     "^method must be one of l2, bn, wanda, obs for structures=channels"),
    ({"structures": "channels", "ratio": 0.5, "refine": "bias"}, ValueError,
     "^refine must be one of none, lstsq, snows for structures=channels, got 'bias'"),
    ({"structures": "channels", "ratio": 0.5, "target": "dense"}, ValueError, "^target applies to structures mlp"),
    ({"structures": "channels", "ratio": 0.5, "damp": -1}, ValueError, "^damp must be a number >= 0"),
    ({"structures": "channels", "ratio": 0.5, "max_batches": 0}, ValueError, "^max_batches must be an integer >= 1"),
    ({"structures": "channels", "ratio": 0.5, "exclude": [1]}, TypeError, "^exclude must be a regex or a list"),
    ({"structures": "channels", "ratio": 0.5, "recalibrate_bn": "yes"}, TypeError, "^recalibrate_bn must be True"),
    ({"structures": "mlp", "ratio": 0.5, "recalibrate_bn": False}, ValueError,
     "^recalibrate_bn applies to structures=channels .*, not mlp"),
    ({"structures": "heads", "ratio": 0.5, "exclude": ["fc"]}, ValueError, "^exclude applies to structures=channels"),
])
def test_every_bad_channel_option_is_named(options, error, match):
    with pytest.raises(error, match=match):
        StructuredConfig(**options).validate()
    with pytest.raises(error, match="structured."):
        StructuredConfig(**options).validate("structured.")


def test_the_keywords_are_those_of_a_direct_call():
    config = StructuredConfig(structures="channels", flops=0.4, method="bn", refine="none", recalibrate_bn=False,
                              exclude=["^0\\.", "fc"], damp=0.5, max_batches=1)
    assert config.validate() == ("channels",) and config.needs_data
    kwargs = channel_kwargs(config)
    assert {k: kwargs[k] for k in ("score", "flops", "refine", "recalibrate_bn", "damp", "max_batches", "exclude")} == {
        "score": "bn", "flops": 0.4, "refine": None, "recalibrate_bn": False, "damp": 0.5, "max_batches": 1,
        "exclude": "(?:^0\\.)|(?:fc)"}
    assert "recalibrate_bn" not in channel_kwargs(StructuredConfig(structures="channels", ratio=0.5))
    assert channel_kwargs(StructuredConfig(structures="channels", ratio=0.5, multiple_of=8))["multiple_of"] == 8
    torch.manual_seed(0)
    a = small_cnn(width=8).eval()
    b = copy.deepcopy(a)
    pk.prune_channels(a, CALIB, **kwargs)
    pk.prune_channels(b, CALIB, score="bn", flops=0.4, refine=None, recalibrate_bn=False, damp=0.5, max_batches=1,
                      exclude="^0\\.|fc")
    assert a[0][0].out_channels == 8 and a[1][0].out_channels < 8  # the stem's group stays (excluded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prune_structured_points_to_prune_channels_and_changes_nothing():
    model = small_cnn(width=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="structures='channels' is prunekit.prune_channels"):
        pk.prune_structured(model, CALIB, structures="channels", ratio=0.5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_rank_by_measures_the_tables_a_direct_call_is_given(monkeypatch):
    """rank_by=sensitivity+latency with speedup=: the job measures both tables on the model (latency
    replaced here by a hand-made table: timings are not asserted) and passes them with the rest."""
    from prunekit.structures import channel_options
    from prunekit.structures.channel_latency import ChannelLatency
    from prunekit.structures.channels_graph import find_channel_groups

    torch.manual_seed(0)
    a = small_cnn(width=8).eval()
    b = copy.deepcopy(a)
    groups = [g.name for g in find_channel_groups(a, CALIB[0]).groups]
    table = ChannelLatency(10.0, {g: {w: float(8 - w) / len(groups) for w in range(1, 9)} for g in groups})
    seen = []
    monkeypatch.setattr(channel_options, "measure_channel_latency", lambda m, x, **kw: seen.append(x) or table)
    config = StructuredConfig(structures="channels", speedup=1.2, budget="global", rank_by="sensitivity+latency",
                              method="l2", refine="lstsq", damp=0.01)
    assert config.validate() == ("channels",)
    tables = channel_options.channel_tables(config, a, CALIB)
    assert tables["latency"] is table and torch.equal(seen[0][0], CALIB[0])  # timed on the first calibration batch
    sens = tables["sensitivity"]
    assert set(sens.error) == set(groups) and sens.score == "l2" and sens.batches == len(CALIB)
    result = pk.prune_channels(a, CALIB, **channel_kwargs(config), **tables)
    direct = pk.prune_channels(b, CALIB, score="l2", refine="lstsq", damp=0.01, budget="global", speedup=1.2,
                               latency=table, sensitivity=sens)
    assert result.predicted_speedup == direct.predicted_speedup >= 1.2
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert channel_options.channel_tables(StructuredConfig(structures="channels", flops=0.3), a, CALIB) == {}
