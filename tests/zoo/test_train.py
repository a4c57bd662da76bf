"""The zoo's classifier training loop: both optimizers learn, a bad name is refused."""
import pytest
import torch
from torch import nn

from prunekit.zoo.train import accuracy, train_classifier


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    return x, (x[:, 0] > 0).long()


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adamw", 0.1)])
def test_learns_a_linear_rule(optimizer, lr):
    x, y = _data()
    torch.manual_seed(0)
    model = train_classifier(nn.Linear(4, 2), x, y, epochs=10, lr=lr, batch_size=32, optimizer=optimizer, progress=False)
    assert not model.training
    assert accuracy(model, x, y) >= 95.0


def test_unknown_optimizer():
    x, y = _data()
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(model, x, y, optimizer="adam", progress=False)
    assert torch.equal(model.weight, before)
