"""The layer kind of ``nn.Conv1d`` / ``nn.Conv2d``, grouped and depthwise included."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sparsity.layout import from_matrix, to_matrix
from .base import LayerKind


class ConvKind(LayerKind):
    """``nn.Conv1d`` / ``nn.Conv2d``: columns ordered (kernel position, input channel), so M
    consecutive columns are M input channels at one position (the N:M convention of NVIDIA's
    2:4); every output position of every image is a row (im2col), unfolded per call so the
    calibration set is never materialised at once. A grouped convolution is one unit per group
    (``weight[g0]``, ...): group g's output channels read only its own input channels, so each
    group is a ``[C_out/g, k * C_in/g]`` problem with its own Hessian."""

    name = "conv"
    types = (nn.Conv1d, nn.Conv2d)

    def units(self, module: nn.Module) -> tuple[str, ...]:
        return ("",) if module.groups == 1 else tuple(f"weight[g{g}]" for g in range(module.groups))

    def _rows(self, module: nn.Module, unit: str) -> slice:
        if not unit:
            return slice(None)
        g, per = int(unit[len("weight[g"):-1]), module.out_channels // module.groups
        return slice(g * per, (g + 1) * per)

    def shape(self, module: nn.Module, unit: str = "") -> tuple[int, ...]:
        return tuple(module.weight[self._rows(module, unit)].shape)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        return to_matrix(module.weight.detach()[self._rows(module, unit)])

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        rows = self._rows(module, unit)
        out = torch.zeros(module.weight.shape, dtype=torch.bool, device=mask.device)
        out[rows] = from_matrix(mask, out[rows].shape)
        return out

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        block = module.weight[self._rows(module, unit)]
        block.copy_(from_matrix(matrix.to(module.weight.dtype), block.shape))

    def nm_why_not(self, module: nn.Module, unit: str, m: int) -> str | None:
        per = module.in_channels // module.groups
        if per == 1 and module.groups > 1:
            return ("depthwise kernel: one input channel per group, so no N:M group along input channels "
                    "exists; prune it unstructured or exclude it")
        if module.groups == 1:  # groups of M consecutive (position, channel) columns, as for Linear
            return super().nm_why_not(module, unit, m)
        if per % m:
            return (f"{per} input channels per group is not a multiple of {m} "
                    "(N:M runs along each group's input channels at one kernel position)")
        return None

    def _unfold(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, k, C_in]``: every output position's receptive field."""
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-1)
            ks, st, pd, dl = (module.kernel_size[0], 1), (module.stride[0], 1), (module.padding[0], 0), (module.dilation[0], 1)
        else:
            ks, st, pd, dl = module.kernel_size, module.stride, module.padding, module.dilation
        if isinstance(pd, str) and pd != "valid":
            raise NotImplementedError(f"padding={pd!r} is not supported for calibration (give the padding as numbers)")
        pd = (0,) * len(ks) if isinstance(pd, str) else tuple(pd)
        if module.padding_mode != "zeros" and any(pd):
            x = F.pad(x, [p for p in reversed(pd) for _ in range(2)], mode=module.padding_mode)
            pd = (0,) * len(pd)
        cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st)  # [B, C_in*k, L], C_in slowest
        b, _, length = cols.shape
        c_in = x.shape[1]
        return cols.view(b, c_in, cols.shape[1] // c_in, length).permute(0, 3, 2, 1)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        return self.unit_inputs(module, args, {}, (unit,))[unit]

    def unit_inputs(self, module: nn.Module, args: tuple, kwargs: dict, units: Sequence[str]) -> dict[str, torch.Tensor]:
        cols = self._unfold(module, args[0])
        b, length, k, c_in = cols.shape
        per = c_in // module.groups
        out = {}
        for unit in units:
            g = int(unit[len("weight[g"):-1]) if unit else 0
            part = cols if not unit else cols[..., g * per:(g + 1) * per]
            out[unit] = part.reshape(b * length, k * part.shape[-1])
        return out
