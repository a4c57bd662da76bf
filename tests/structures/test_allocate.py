"""The global allocation: ranked against a brute force over every subset of units, floors and the
grouped-query rule kept, scores normalised per layer (rescaling a layer changes nothing)."""
import itertools
import math

import pytest
import torch
from torch import nn

from prunekit.structures.allocate import allocate, steps, unit_scores
from prunekit.structures.find import find_structures
from prunekit.structures.units import Structure


def _mlps(sizes):
    return [Structure("mlp", f"l{i}", (f"l{i}.up",), f"l{i}.down", n) for i, n in enumerate(sizes)]


def _brute_force(found, scores, count, floor):
    """Counts of the cheapest set of ``count`` units (sum of scores) that leaves every structure
    at least ceil(floor * units) (and one) units: every subset tried."""
    units = [(s.owner, float(v)) for s in found for v in scores[s.owner]]
    keep = {s.owner: max(1, math.ceil(floor * s.units - 1e-9)) for s in found}
    best, best_counts = float("inf"), None
    for subset in itertools.combinations(range(len(units)), count):
        counts = {s.owner: 0 for s in found}
        for i in subset:
            counts[units[i][0]] += 1
        if any(s.units - counts[s.owner] < keep[s.owner] for s in found):
            continue
        total = sum(units[i][1] for i in subset)
        if total < best:
            best, best_counts = total, counts
    return best_counts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("floor", [0.0, 0.25, 0.5])
def test_allocation_is_the_brute_force_optimum(seed, floor):
    found = _mlps([4, 5, 6])
    g = torch.Generator().manual_seed(seed)
    scores = {s.owner: torch.rand(s.units, generator=g, dtype=torch.float64) * (1 + 3 * i)
              for i, s in enumerate(found)}
    reachable = sum(s.units - max(1, math.ceil(floor * s.units - 1e-9)) for s in found)
    for count in range(0, reachable + 1, 2):
        got = allocate(found, scores, {s.owner: 1 for s in found}, count, floor)
        assert got == _brute_force(found, scores, count, floor), count


def test_grouped_heads_lose_one_head_per_group_and_keep_their_floor():
    heads = Structure("heads", "attn", ("attn.q",), "attn.o", 8, unit_size=2, kv_producers=("attn.k", "attn.v"),
                      q_per_kv=4)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.05, 0.8, 0.7, 0.6], dtype=torch.float64)
    got = steps(0, heads, scores, floor=0.5)
    assert [st.units for st in got] == [2, 2]  # 4 per group, half kept: two steps of one head per group
    assert got[0].score == pytest.approx((0.1 + 0.05) / 2)  # the weakest of each group together
    assert got[1].score == pytest.approx((0.2 + 0.6) / 2)
    mlp = _mlps([8])[0]
    counts = allocate([heads, mlp], {"attn": scores, "l0": torch.full((8,), 0.5, dtype=torch.float64)},
                      {"attn": 1, "l0": 1}, 6, floor=0.5)
    assert counts == {"attn": 4, "l0": 2}  # both head steps (0.075, 0.4) score below the neurons' 0.5


def test_multiple_of_steps_keep_widths_on_the_grid():
    s = _mlps([10])[0]
    got = steps(0, s, torch.arange(10, dtype=torch.float64), floor=0.0, multiple_of=4)
    assert [st.units for st in got] == [2, 4]  # kept widths 8, then 4
    assert got[0].score == pytest.approx(0.5) and got[1].score == pytest.approx(3.5)


def test_an_unreachable_goal_is_refused_and_ties_are_deterministic():
    found = _mlps([4, 4])
    flat = {s.owner: torch.ones(4, dtype=torch.float64) for s in found}
    with pytest.raises(ValueError, match="floor=0.5"):
        allocate(found, flat, {"l0": 1, "l1": 1}, 6, floor=0.5)
    assert allocate(found, flat, {"l0": 1, "l1": 1}, 3, floor=0.0) == {"l0": 3, "l1": 0}  # ties: earlier layer


def _mlp_stack():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 6)) for _ in range(3)]).eval()


def test_scores_are_wanda_divided_by_the_layer_mean_and_scale_free():
    model = _mlp_stack()
    calls = [((torch.randn(16, 6, generator=torch.Generator().manual_seed(i)),), {}) for i in range(3)]
    found = find_structures(model)
    got = unit_scores(model, found, calls, "wanda")
    with torch.no_grad():  # the oracle: every consumer input held at once
        x = torch.cat([c[0][0] for c in calls])
        for i, block in enumerate(model):
            h = block[1](block[0](x))
            raw = block[2].weight.double().pow(2).sum(0) * h.double().pow(2).mean(0)
            torch.testing.assert_close(got[str(i)], raw / raw.mean())
            x = block(x)
    assert torch.equal(unit_scores(model, found, calls, "obs")["0"], got["0"])
    with torch.no_grad():
        model[1][2].weight.mul_(10)  # a louder layer: the same normalised scores
    torch.testing.assert_close(unit_scores(model, found, calls, "wanda")["1"], got["1"])
