"""The layer kind of ``nn.MultiheadAttention``: four units in two parameters.

The q, k and v projections are the row blocks of ``in_proj_weight`` (``in_proj_weight[q]``,
``[k]``, ``[v]``; or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when the key and
value widths differ from the query's) and read the query, key and value; ``out_proj.weight``
reads the attention output before ``out_proj``. The module calls ``out_proj`` functionally
(``F.multi_head_attention_forward`` takes its weight), so that input is never seen by a hook on
``out_proj``: it is recomputed from the captured call, exactly, by running the module once more
with ``out_proj`` set to the identity. ``out_proj`` depends on q, k and v, so it is calibrated
after them (a later stage).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from .base import LayerKind

_QKV = ("q", "k", "v")
_OUT = "out_proj.weight"
_INPUTS = {"q": "query", "k": "key", "v": "value"}


class MultiheadAttentionKind(LayerKind):
    """``nn.MultiheadAttention``: q, k, v and out_proj as separate ``[d_out, d_in]`` units."""

    name = "attention"
    types = (nn.MultiheadAttention,)

    def units(self, module: nn.Module) -> tuple[str, ...]:
        return (*self._qkv_units(module), _OUT)

    def stages(self, module: nn.Module) -> tuple[tuple[str, ...], ...]:
        return (self._qkv_units(module), (_OUT,))

    @staticmethod
    def _qkv_units(module: nn.Module) -> tuple[str, ...]:
        if module._qkv_same_embed_dim:
            return tuple(f"in_proj_weight[{p}]" for p in _QKV)
        return tuple(f"{p}_proj_weight" for p in _QKV)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        names = ("in_proj_weight",) if module._qkv_same_embed_dim else tuple(f"{p}_proj_weight" for p in _QKV)
        return {**{n: getattr(module, n) for n in names}, _OUT: module.out_proj.weight}

    def parameter(self, module: nn.Module, unit: str = "") -> nn.Parameter:
        if unit == _OUT:
            return module.out_proj.weight
        return getattr(module, unit.split("[")[0])

    @staticmethod
    def _role(unit: str) -> str:
        """"q", "k", "v" or "out"."""
        if unit == _OUT:
            return "out"
        return unit[len("in_proj_weight["):-1] if unit.startswith("in_proj_weight[") else unit[0]

    def _rows(self, module: nn.Module, unit: str) -> slice:
        if not unit.startswith("in_proj_weight["):
            return slice(None)
        i, e = _QKV.index(self._role(unit)), module.embed_dim
        return slice(i * e, (i + 1) * e)

    def shape(self, module: nn.Module, unit: str = "") -> tuple[int, ...]:
        return tuple(self.matrix(module, unit).shape)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        return self.parameter(module, unit).detach()[self._rows(module, unit)]

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        out = torch.zeros(self.parameter(module, unit).shape, dtype=torch.bool, device=mask.device)
        out[self._rows(module, unit)] = mask
        return out

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        param = self.parameter(module, unit)
        param[self._rows(module, unit)] = matrix.to(param.dtype)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        return self.unit_inputs(module, args, {}, (unit,))[unit]

    def unit_inputs(self, module: nn.Module, args: tuple, kwargs: dict, units: Sequence[str]) -> dict[str, torch.Tensor]:
        call = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        call.pop("self")
        out = {}
        for unit in units:
            role = self._role(unit)
            x = attention_before_out_proj(module, call) if role == "out" else call[_INPUTS[role]]
            out[unit] = x.reshape(-1, x.shape[-1])
        return out


@torch.no_grad()
def attention_before_out_proj(module: nn.MultiheadAttention, call: dict) -> torch.Tensor:
    """The input ``out_proj`` would see in this call: the module run again with ``out_proj`` set
    to the identity (exact: ``x @ I + 0`` is ``x`` in floating point)."""
    weight, bias = module.out_proj.weight, module.out_proj.bias
    saved = weight.data, None if bias is None else bias.data
    try:
        weight.data = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        if bias is not None:
            bias.data = torch.zeros_like(bias)
        return module.forward(**{**call, "need_weights": False})[0]
    finally:
        weight.data = saved[0]
        if bias is not None:
            bias.data = saved[1]
