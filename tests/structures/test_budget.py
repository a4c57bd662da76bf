"""Budgets end to end: a global budget's counts are the brute-force optimum of the normalised
scores and respect the floors, a FLOPs target is hit within one unit, and bad targets are refused
with the model unchanged."""
import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk

from helpers.llama_toys import token_batches
from prunekit.structures.budget import counts_for
from prunekit.structures.costs import unit_flops
from prunekit.structures.find import find_structures


def _tokens(n=4, seed=1):
    return token_batches(n, seed, length=24)


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    return tiny_llama(2)


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 6)) for _ in range(3)]).eval()


def test_global_counts_are_the_brute_force_optimum_on_a_tiny_stack():
    model = _stack()
    data = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():  # the oracle: Wanda scores from every input at once, over each layer's mean
        x, units = torch.cat(data), []
        for i, block in enumerate(model):
            raw = block[2].weight.double().pow(2).sum(0) * block[1](block[0](x)).double().pow(2).mean(0)
            units += [(i, float(v)) for v in raw / raw.mean()]
            x = block(x)
    floor = 0.4  # each layer keeps 2 of its 5 neurons
    for count in (3, 6, 9):
        best = min((c for c in itertools.combinations(units, count)
                    if all(sum(u[0] == i for u in c) <= 3 for i in range(3))), key=lambda c: sum(u[1] for u in c))
        want = [5 - sum(u[0] == i for u in best) for i in range(3)]
        m = copy.deepcopy(model)
        result = pk.prune_structured(m, data, ratio=count / 15, budget="global", floor=floor, progress=False)
        assert [r.units_after for r in result.reports] == want


def test_global_floors_hold_and_widths_differ(llama):
    m = copy.deepcopy(llama)
    with pytest.warns(UserWarning, match="load_structured"):
        result = pk.prune_structured(m, _tokens(), structures="mlp", params=0.3, budget="global", floor=0.4,
                                     progress=False)
    after = [r.units_after for r in result.reports]
    assert min(after) >= math.ceil(0.4 * 128) and len(set(after)) > 1
    assert [m.model.layers[i].mlp.down_proj.in_features for i in range(2)] == after
    assert m.config.intermediate_size == 128  # the config cannot say two widths; the shapes record does
    assert m.config.prunekit_shapes["parameters"]["model.layers.1.mlp.up_proj.weight"] == [after[1], 64]


def test_global_ratio_counts_neurons_and_heads_apart(llama):
    counts = counts_for(llama, find_structures(llama, ("mlp", "heads")), 0.5, None, budget="global", floor=0.25,
                        method="magnitude")
    assert sum(v for k, v in counts.items() if k.endswith("mlp")) == 128
    assert sum(v for k, v in counts.items() if k.endswith("attn")) == 4
    assert all(v % 2 == 0 for k, v in counts.items() if k.endswith("attn"))  # one head from each kv group


@pytest.mark.parametrize("budget", ["uniform", "global"])
def test_flops_target_is_hit_within_one_unit(llama, budget):
    m = copy.deepcopy(llama)
    found = find_structures(llama, ("mlp", "heads"))
    from prunekit.structures.costs import layer_flops

    before = layer_flops(llama, found, 24)
    pk.prune_structured(m, _tokens(), structures="mlp,heads", flops=0.3, budget=budget, progress=False,
                        **({"floor": 0.25} if budget == "global" else {}))
    after = layer_flops(m, find_structures(m, ("mlp", "heads")), 24)
    # one unit: a neuron under a global budget; under a uniform one, a neuron in every layer
    unit = max(unit_flops(llama, s, 24) * (s.kv_heads if s.kind == "heads" else 1) for s in found)
    assert abs((before - after) - 0.3 * before) <= unit * (1 if budget == "global" else len(found))


@pytest.mark.parametrize("kwargs, match", [
    (dict(params=0.6, budget="global", floor=0.5), "floor=0.5"),
    (dict(ratio=0.2, params=0.2), "exactly one"),
    (dict(ratio=0.2, flops=0.2), "exactly one"),
    (dict(ratio=0.2, floor=0.3), "applies to budget='global'"),
    (dict(ratio=0.2, budget="erk"), "budget must be"),
    (dict(flops=1.5), "flops must be"),
    (dict(ratio=0.2, budget="global", floor=1.0), "floor must be"),
])
def test_bad_targets_are_refused_and_the_model_is_unchanged(llama, kwargs, match):
    m = copy.deepcopy(llama)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    config = m.config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match):
            pk.prune_structured(m, _tokens(), structures="mlp,heads", progress=False, **kwargs)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert m.config.to_dict() == config and not m.training
