"""One 2-D view of every prunable weight, shared by all methods.

Every weight is seen as a matrix ``[d_out, d_in]`` whose columns line up with the columns of
the layer's (unfolded) input. For convolutions the columns are ordered
``(kernel position, input channel)``, so that M consecutive columns are M consecutive input
channels at one kernel position: the N:M convention of NVIDIA's 2:4 and of SNOWS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``[N, d_in]`` in the column order of :func:`to_matrix`.

    Linear: all leading dimensions are flattened into rows (tokens). Conv: every output
    position of every image is a row (im2col), unfolded per call so the whole calibration
    set is never materialised at once.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise NotImplementedError("grouped / depthwise convolutions need a per-group fit")
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-1)
            ks, st, pd, dl = (module.kernel_size[0], 1), (module.stride[0], 1), (_pad(module.padding, 1)[0], 0), (module.dilation[0], 1)
        else:
            ks, st, pd, dl = module.kernel_size, module.stride, _pad(module.padding, 2), module.dilation
        if module.padding_mode != "zeros" and any(pd):
            x = F.pad(x, [p for p in reversed(pd) for _ in range(2)], mode=module.padding_mode)
            pd = (0,) * len(pd)
        cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st)  # [B, C_in*k, L], C_in slowest
        b, _, length = cols.shape
        c_in = x.shape[1]
        k = cols.shape[1] // c_in
        cols = cols.view(b, c_in, k, length).permute(0, 3, 2, 1)  # [B, L, k, C_in]
        return cols.reshape(b * length, k * c_in)
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def _pad(padding, dims: int) -> tuple[int, ...]:
    if isinstance(padding, str):
        raise NotImplementedError("string padding ('same'/'valid') is not supported for calibration")
    return tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * dims
