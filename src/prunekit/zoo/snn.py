"""A small multi-step leaky integrate-and-fire (LIF) CNN with a surrogate gradient, for MNIST.

The image is fed as a constant input current for ``T`` time steps (direct encoding). Convolutions
run once over all time steps stacked in the batch; the LIF neurons then integrate over time:
``v <- v + (x - v)/tau``, spike ``H(v - v_th)`` with an arctan surrogate derivative, hard reset to
0. The logits are the time-averaged classifier output, so weight gradients are BPTT gradients
summed over time steps. The classifier is named ``classifier`` (excluded from pruning by default,
as in the SEW ResNet reference).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SpikeFn(torch.autograd.Function):
    """Heaviside forward, arctan surrogate backward: ``alpha / (2 (1 + (pi/2 alpha x)^2))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * a / (2 * (1 + (math.pi / 2 * a * x) ** 2)), None


class LIF(nn.Module):
    """Multi-step LIF neurons over input ``[T, B, ...]``; returns spikes of the same shape."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0) -> None:
        super().__init__()
        self.tau, self.v_threshold, self.alpha = tau, v_threshold, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[0])
        spikes = []
        for x_t in x:
            v = v + (x_t - v) / self.tau
            s = SpikeFn.apply(v - self.v_threshold, self.alpha)
            v = v * (1 - s)
            spikes.append(s)
        return torch.stack(spikes)


class SpikingCNN(nn.Module):
    """conv-BN-LIF-pool x2, then a linear classifier on time-averaged outputs (T time steps)."""

    def __init__(self, width: int = 8, T: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.T = T
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.lif1, self.lif2 = LIF(), LIF()
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(2 * width * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = self.T, x.shape[0]
        h = self.bn1(self.conv1(x))  # the same input current at every time step
        h = self.pool(self.lif1(h.unsqueeze(0).expand(T, *h.shape)).flatten(0, 1))  # [T*B, C, 14, 14]
        h = self.bn2(self.conv2(h))
        h = self.pool(self.lif2(h.view(T, B, *h.shape[1:])).flatten(0, 1))  # [T*B, 2C, 7, 7]
        return self.classifier(h.flatten(1)).view(T, B, -1).mean(0)
