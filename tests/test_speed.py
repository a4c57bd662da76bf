"""Measured latency: medians of timed forwards after warm-up, models taking turns, sizes from model_report."""
import time

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.speed import forward_latency, speed_report


class Sleeper(nn.Module):
    """Sleeps ``seconds`` per forward (``first`` for the first ``slow_calls``); logs its calls."""

    def __init__(self, seconds, log, name, first=None, slow_calls=0):
        super().__init__()
        self.seconds, self.log, self.name, self.first, self.slow_calls = seconds, log, name, first, slow_calls
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        slow = self.first is not None and sum(n == self.name for n in self.log) < self.slow_calls
        self.log.append(self.name)
        time.sleep(self.first if slow else self.seconds)
        return self.lin(x)


def test_the_median_excludes_warm_up_and_the_models_take_turns():
    log = []
    fast = Sleeper(0.004, log, "fast", first=0.3, slow_calls=2)  # a slow first call (compilation, caches)
    slow = Sleeper(0.012, log, "slow")
    times = forward_latency({"fast": fast, "slow": slow}, torch.randn(2, 4), repeats=5, warmup=2)
    assert log == ["fast", "slow"] * 7
    assert [len(t) for t in times.values()] == [5, 5]
    fast_ms, slow_ms = sorted(times["fast"])[2], sorted(times["slow"])[2]
    assert 4 <= fast_ms < 100 and 12 <= slow_ms < 100  # sleeps are lower bounds; the warm-up's 300 ms is out
    assert fast_ms < slow_ms


def test_a_report_against_a_baseline_counts_what_model_report_counts_and_leaves_both_models():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)).train()
    small = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)).train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (small, dense)]
    x = torch.randn(5, 8)
    r = speed_report(small, x, dense, names=("small", "dense"), repeats=3, warmup=1)
    assert (r.model.name, r.baseline.name) == ("small", "dense")
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (r.model.params, r.baseline.params) == (params(small), params(dense))
    # the two linears on 5 rows: one multiply-accumulate (2 FLOPs) per weight per row
    assert r.model.flops == 2 * 5 * (8 * 12 + 12 * 8) and r.baseline.flops == 2 * 5 * (8 * 32 + 32 * 8)
    ratios = r.ratios()
    assert ratios["params"] == params(small) / params(dense) and ratios["flops"] == 12 / 32
    assert ratios["speedup"] == r.baseline.median_ms / r.model.median_ms
    assert len(r.model.times_ms) == 3 and r.threads == torch.get_num_threads()
    assert "x0.375" in r.to_terminal() and r.to_dict()["ratios"] == ratios
    for m, b in zip((small, dense), before):
        assert m.training and all(torch.equal(m.state_dict()[k], v) for k, v in b.items())
    alone = pk.speed_report(small, x, repeats=1, warmup=0)
    assert alone.baseline is None and alone.ratios() == {} and "model / baseline" not in alone.to_terminal()


@pytest.mark.parametrize("kwargs,match", [({"repeats": 0}, "repeats must be"), ({"warmup": -1}, "warmup must be")])
def test_bad_counts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        forward_latency({"m": nn.Linear(2, 2)}, torch.randn(1, 2), **kwargs)
