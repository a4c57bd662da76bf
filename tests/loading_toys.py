"""Tiny models for the loading and recipe tests, imported as ``loading_toys:factory``."""
import torch
from torch import nn


def tiny_mlp(width: int = 16, classes: int = 4) -> nn.Module:
    """An 8 -> width -> width -> classes MLP (deterministic weights)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def not_a_model(**_):
    return "not a model"


NOT_CALLABLE = 3


class _Slow(nn.Module):
    """Sleeps in every forward, so that a test can interrupt pruning while it runs."""

    def forward(self, x):
        import time

        time.sleep(0.05)
        return x


def slow_mlp(marker: str = "") -> nn.Module:
    """tiny_mlp with a sleep in every forward; writes ``marker`` once built (the test's cue)."""
    model = tiny_mlp()
    model.insert(1, _Slow())
    if marker:
        open(marker, "w").close()
    return model
