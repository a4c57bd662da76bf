"""One 2-D view of every prunable weight, shared by all methods.

Every weight is seen as a matrix ``[d_out, d_in]`` whose columns line up with the columns of
the layer's (unfolded) input. For convolutions the columns are ordered
``(kernel position, input channel)``, so that M consecutive columns are M consecutive input
channels at one kernel position: the N:M convention of NVIDIA's 2:4 and of SNOWS.
"""
from __future__ import annotations

import torch


def to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``[d_out, d_in]`` view (a copy for convs) of a Linear/Conv weight."""
    if weight.dim() == 2:
        return weight
    # [C_out, C_in, *k] -> [C_out, *k, C_in] -> [C_out, prod(k)*C_in]
    perm = (0, *range(2, weight.dim()), 1)
    return weight.permute(*perm).reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_matrix` for a weight of ``shape``."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    c_out, c_in, *k = shape
    inv = (0, len(shape) - 1, *range(1, len(shape) - 1))
    return matrix.reshape(c_out, *k, c_in).permute(*inv).contiguous()
