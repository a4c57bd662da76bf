"""Small models and a training loop shared by the group-pruner tests: a CNN with a concatenation,
a squeeze-excitation gate, BatchNorm and flatten -> Linear; a residual MLP block (fc1 -> fc2)."""
from __future__ import annotations

import torch
from torch import nn

from helpers.cnn_toys import ConcatSE


class Block(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConcatSE().train()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), Block(), Block(), nn.Linear(8, 4))


def data(kind: str, seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g) if kind == "cnn" else torch.randn(n, 6, generator=g)
    return x, torch.randint(0, 10 if kind == "cnn" else 4, (n,), generator=g)


def train(model, opt, pruner, x, y, steps: int) -> None:
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())
