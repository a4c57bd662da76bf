"""Making modules physically smaller: output rows of producers, input columns of consumers.

Works in place on ``nn.Linear`` and transformers' ``Conv1D`` (weight stored ``[d_in, d_out]``), so
module names, hooks and the model's ``state_dict`` keys stay; only shapes change. Every change is
recorded in an :class:`Undo` log first, so a failure can put the model back exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.base import kind_of
from .units import Structure


class Undo:
    """A log of attribute values replaced during surgery; :meth:`restore` puts them back in
    reverse order (the old tensors are kept by reference, never copied)."""

    def __init__(self) -> None:
        self._log: list[tuple[Any, str, Any, bool]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        had = hasattr(obj, name)
        self._log.append((obj, name, getattr(obj, name, None), had))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old, had in reversed(self._log):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._log.clear()


def _is_conv1d(module: nn.Module) -> bool:
    return kind_of(module).name == "hf-conv1d"


def matrix(module: nn.Module) -> torch.Tensor:
    """The ``[d_out, d_in]`` matrix of a Linear or Conv1D, as its layer kind sees it (a view:
    never write into it)."""
    return kind_of(module).matrix(module)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.to(dtype=like.dtype, device=like.device).contiguous(), requires_grad=like.requires_grad)


def keep_outputs(module: nn.Module, rows: torch.Tensor, undo: Undo) -> None:
    """Keep only the output features ``rows`` (indices) of a Linear or Conv1D, or the rows of the
    stacked q/k/v ``in_proj_weight`` of the ``nn.MultiheadAttention`` drop-in."""
    if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        undo.set(module, "in_proj_weight", _param(module.in_proj_weight.detach()[rows], module.in_proj_weight))
        if module.in_proj_bias is not None:
            undo.set(module, "in_proj_bias", _param(module.in_proj_bias.detach()[rows], module.in_proj_bias))
        return
    w = module.weight.detach()
    if _is_conv1d(module):
        undo.set(module, "weight", _param(w[:, rows], module.weight))
        undo.set(module, "nf", len(rows))
    else:
        undo.set(module, "weight", _param(w[rows], module.weight))
        undo.set(module, "out_features", len(rows))
    if module.bias is not None:
        undo.set(module, "bias", _param(module.bias.detach()[rows], module.bias))


def add_zero_bias(module: nn.Module, undo: Undo) -> None:
    """Give a bias-free Linear/Conv1D a zero bias (so a config flag like ``mlp_bias`` stays true)."""
    if getattr(module, "bias", False) is None:  # no `bias` (the attention drop-in): no config flag covers it
        width = module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]
        undo.set(module, "bias", nn.Parameter(torch.zeros(width, dtype=module.weight.dtype,
                                                          device=module.weight.device)))


def set_inputs(module: nn.Module, new_matrix: torch.Tensor, new_bias: torch.Tensor | None, undo: Undo) -> None:
    """Replace a consumer's matrix by ``new_matrix`` ``[d_out, k]`` (fewer input columns) and, if
    given, its bias (added when the module had none)."""
    if _is_conv1d(module):
        undo.set(module, "weight", _param(new_matrix.T, module.weight))
        undo.set(module, "nx", new_matrix.shape[1])
    else:
        undo.set(module, "weight", _param(new_matrix, module.weight))
        undo.set(module, "in_features", new_matrix.shape[1])
    if new_bias is not None:
        like = module.bias if module.bias is not None else module.weight
        undo.set(module, "bias", nn.Parameter(new_bias.to(dtype=like.dtype, device=like.device).contiguous(),
                                              requires_grad=like.requires_grad))


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads else \
        torch.zeros(0, dtype=torch.long)


def shrink(model: nn.Module, s: Structure, keep: list[int], new_matrix: torch.Tensor, new_bias: torch.Tensor | None,
           undo: Undo) -> None:
    """Remove every unit of ``s`` not in ``keep`` (sorted unit indices): producer rows (in every
    part of fused q/k/v producers), key/value rows where whole key/value heads go, the consumer's
    columns (given repaired as ``new_matrix``), and the width attributes."""
    modules = dict(model.named_modules())
    rows = torch.tensor(keep, dtype=torch.long) if s.kind == "mlp" else head_rows(keep, s.unit_size)
    part = s.units * s.unit_size
    rows = torch.cat([p * part + rows for p in range(s.fused)])
    for name in s.producers:
        keep_outputs(modules[name], rows, undo)
    if new_bias is not None:
        for name in (*s.producers, *s.kv_producers):
            add_zero_bias(modules[name], undo)
    owner = modules[s.attributes_at or s.owner]
    if s.kind == "heads":
        kept_kv = sorted({h // s.q_per_kv for h in keep})
        if s.q_per_kv == 1:  # each head has its own key and value
            for name in s.kv_producers:
                keep_outputs(modules[name], head_rows(kept_kv, s.unit_size), undo)
        elif len(kept_kv) != s.kv_heads:
            raise ValueError(f"{s.owner}: every key/value group must keep at least one query head")
        q_per_kv = len(keep) // len(kept_kv)
        inner = len(keep) * s.unit_size  # BERT's all_head_size, GPT-2's split_size
        for attr, value in (("num_key_value_groups", q_per_kv), ("num_heads", len(keep)),
                            ("num_attention_heads", len(keep)), ("num_key_value_heads", len(kept_kv)),
                            ("all_head_size", inner), ("split_size", inner)):
            if isinstance(getattr(owner, attr, None), int):
                undo.set(owner, attr, value)
    elif isinstance(getattr(owner, "intermediate_size", None), int):
        undo.set(owner, "intermediate_size", len(keep))
    set_inputs(modules[s.consumer], new_matrix, new_bias, undo)
