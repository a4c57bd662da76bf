import pytest
import torch
from torch import nn

from prunekit.training import STR, SoftThreshold
from prunekit.training.shadow import shadow_weight, unshadow
from helpers.training_toys import TARGETS, data, make


def test_forward_uses_the_transform_and_the_parameter_is_back_afterwards():
    layer = nn.Linear(4, 3)
    handles = shadow_weight(layer, lambda theta: 2 * theta)
    x = torch.randn(5, 4)
    expected = nn.functional.linear(x, 2 * layer.weight, layer.bias)
    assert torch.equal(layer(x), expected)
    assert layer.weight is layer._parameters["weight"] and "weight" not in layer.__dict__
    assert list(layer.state_dict()) == ["weight", "bias"]
    for h in handles:
        h.remove()
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_a_forward_that_raises_restores_the_parameter_and_the_next_forward_is_right():
    layer = nn.Linear(4, 3)
    shadow_weight(layer, lambda theta: theta * 0)
    with pytest.raises(RuntimeError):
        layer(torch.randn(5, 7))  # wrong width: F.linear raises inside the forward
    assert layer.weight is layer._parameters["weight"] and "weight" not in layer.__dict__
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), layer.bias.detach().expand(5, 3))


def test_unshadow_drops_a_leftover_shadow():
    layer = nn.Linear(4, 3)
    layer.__dict__["weight"] = torch.zeros(3, 4)  # what a KeyboardInterrupt mid-forward could leave
    unshadow(layer)
    assert layer.weight is layer._parameters["weight"]
    unshadow(layer)  # nothing to drop: no error


@pytest.mark.parametrize("kind", ["soft", "str"])
def test_pruners_survive_a_raising_forward(kind):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "soft":
        pruner = SoftThreshold(model, opt, total_steps=10, schedule="constant", final_threshold=0.1, targets=TARGETS)
    else:
        pruner = STR(model, opt, s_init=-2.0, targets=TARGETS)
    x, _ = data()
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 5))
    for n in TARGETS:
        module = model.get_submodule(n)
        assert module.weight is module._parameters["weight"]
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    pruner.finalize()
