"""The layer kind of transformers' ``Conv1D`` (GPT-2, GPT, ...): a linear layer that stores its
weight transposed, ``[d_in, d_out]``, and computes ``x @ W + b``.

Registered by :mod:`prunekit.layers.base` once ``transformers.pytorch_utils`` is imported, so
prunekit itself never imports transformers. The matrix every method sees is ``W.T``, so N:M
groups run along the input axis, as for ``nn.Linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LayerKind


class HFConv1DKind(LayerKind):
    """``transformers.pytorch_utils.Conv1D``: the matrix is ``weight.T``; tokens are rows."""

    name = "hf-conv1d"

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        self.types = (Conv1D,)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        return module.weight.detach().T

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        return mask.T

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        module.weight.copy_(matrix.T.to(module.weight.dtype))

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        x = args[0]
        return x.reshape(-1, x.shape[-1])
