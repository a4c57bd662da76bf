"""The layer kind of ``nn.Linear``: the weight is already the ``[d_out, d_in]`` matrix."""
from __future__ import annotations

import torch
from torch import nn

from .base import LayerKind


class LinearKind(LayerKind):
    """``nn.Linear``: the weight is the matrix; every leading position (token) is a row."""

    name = "linear"
    types = (nn.Linear,)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        x = args[0]
        return x.reshape(-1, x.shape[-1])
