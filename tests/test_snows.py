"""SNOWS's lookahead: which operations are measured, the default or the user's choice."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.snows import Lookahead, is_measured, measured_rule


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _measured(model, spec):
    targets = {id(model[0]), id(model[2])}
    lookahead = Lookahead([("", model)], model[0], 8, targets, {}, {}, measured_rule(spec))
    try:
        return len(lookahead.handles)
    finally:
        lookahead.close()


def test_default_and_chosen_measured_operations():
    model = _mlp()
    assert measured_rule(None) is is_measured
    assert _measured(model, None) == 4  # layers 0 and 2 (the targets), ReLU, Tanh
    assert _measured(model, [nn.ReLU]) == 2  # the refit layer itself is always measured
    assert _measured(model, [r"^(3|4)$"]) == 3
    assert _measured(model, lambda name, module: isinstance(module, nn.Linear)) == 3
    assert not is_measured("layer.downsample.0", model[0], {id(model[0])})  # a shortcut


def test_the_choice_changes_the_refit():
    data = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    weights = []
    for measured in (None, [nn.Tanh]):
        model = _mlp()
        pk.prune(model, data, sparsity=0.6, refine="snows", include_head=True, progress=False,
                 refine_options={"k": 1, "max_cg": 10, "warm_start": "none", "measured": measured})
        weights.append(model[0].weight.detach().clone())
    assert torch.equal(weights[0] != 0, weights[1] != 0) and not torch.equal(weights[0], weights[1])


def test_a_bad_choice_is_refused():
    with pytest.raises(ValueError, match="measured entries must be nn.Module types or name regexes"):
        pk.prune(_mlp(), [torch.randn(4, 8)], sparsity=0.5, refine="snows", refine_options={"measured": [3]})
