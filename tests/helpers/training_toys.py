"""A tiny model, data and training step shared by the training-pruner tests."""
import torch
from torch import nn

TARGETS = ["0", "2"]


def make(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 8, (n,), generator=g)


def train_step(model, opt, pruner, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    pruner.step()
    return loss
