"""The weights a training pruner edits, seen through the layer-kind registry as ``prune()`` sees them.

A target module holds one or more parameters (its layer kind's ``parameters()``): ``nn.Linear``,
convolutions and transformers' ``Conv1D`` one ``weight``; ``nn.MultiheadAttention`` its
``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight``. Each such parameter is an
*entry* of the pruner, named like the module when it is the module's only ``weight`` (the names
of earlier releases) and ``module.parameter`` otherwise (``attn.in_proj_weight``).

An entry holds the kind's *units* that live in it (``in_proj_weight[q]``, ``[k]``, ``[v]``; one per
group of a grouped convolution; the transposed ``Conv1D`` weight): the ``[d_out, d_in]`` matrices
that budgets and N:M groups are counted on, exactly as in ``prune()``.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from ..layers.base import LayerKind, kind_of, unit_name
from ..layers.conv import ConvKind
from ..layers.linear import LinearKind
from ..sparsity import sharding
from ..sparsity.layout import from_matrix, to_matrix
from ..sparsity.patterns import keep_count, topk_keep


@dataclass(frozen=True)
class Entry:
    """One parameter of a target: the target (``module``, named ``module_name``), the module that
    holds the parameter as ``attr`` (``owner``: attention's ``out_proj``), its layer kind (None for
    a module no kind handles, which the group pruners pass) and the kind's units inside it.
    ``simple``: the parameter itself is the only unit, ranked in its own layout (Linear, ungrouped
    convolutions, and a grouped one sharded by FSDP2, whose rows are split across ranks), so FSDP2
    shards work unchanged."""

    module_name: str
    module: nn.Module
    owner: nn.Module
    attr: str
    param: nn.Parameter
    kind: LayerKind | None
    units: tuple[str, ...]

    @property
    def simple(self) -> bool:
        return self.kind is None or (isinstance(self.kind, (LinearKind, ConvKind)) and self.units == ("",))


def _kind(module: nn.Module) -> LayerKind | None:
    try:
        return kind_of(module)
    except TypeError:
        return None


def build_entries(targets: Mapping[str, nn.Module]) -> "OrderedDict[str, Entry]":
    """The entries of ``targets`` (module name -> module), in order; TypeError naming the layer when
    a parameter its kind writes is missing or not an ``nn.Parameter``."""
    out: "OrderedDict[str, Entry]" = OrderedDict()
    for name, module in targets.items():
        kind = _kind(module)
        try:
            params = kind.parameters(module) if kind is not None else {"weight": module.weight}
        except AttributeError as exc:
            raise TypeError(f"target {name!r} has no weight parameter ({exc})") from exc
        for pname, param in params.items():
            if not isinstance(param, nn.Parameter):
                raise TypeError(f"target {name!r} has no weight parameter {pname!r}; pass targets=[...] without it")
            key = name if list(params) == ["weight"] else unit_name(name, pname)
            owner_path, _, attr = pname.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            units = ("",) if kind is None else tuple(u for u in kind.units(module) if kind.parameter(module, u) is param)
            if isinstance(kind, ConvKind) and sharding.is_sharded(param):
                units = ("",)  # FSDP2 rows: a grouped convolution is ranked as one layer (N:M is the same)
            out[key] = Entry(name, module, owner, attr, param, kind, units)
    for key, e in out.items():
        if not e.simple and sharding.is_sharded(e.param):
            raise ValueError(f"parameter {key} ({e.kind.name} layer) is sharded (FSDP2); the pruners split only "
                             "Linear and convolution weights by rows: exclude it with targets=[...] or "
                             "keep that module unsharded")
    return out


@contextlib.contextmanager
def _holding(param: nn.Parameter, data: torch.Tensor) -> Iterator[None]:
    """``param`` reads ``data`` for the duration (the kind's own indexing then applies to it)."""
    saved = param.data
    param.data = data
    try:
        yield
    finally:
        param.data = saved


@torch.no_grad()
def unit_scores(entries: Mapping[str, Entry], scores: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Per-unit ``[d_out, d_in]`` score matrices (keyed by unit name, as ``prune()`` names units),
    from per-entry scores laid out like the parameters; a simple entry is its own unit, as is."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, e in entries.items():
        if e.simple:
            out[key] = scores[key]
            continue
        if isinstance(e.kind, ConvKind):  # groups are row blocks of the matrix: views, no copy per group
            mat, per = to_matrix(scores[key]), e.param.shape[0] // len(e.units)
            for g, u in enumerate(e.units):
                out[unit_name(e.module_name, u)] = mat[g * per:(g + 1) * per]
            continue
        with _holding(e.param, scores[key].to(e.param.dtype)):
            for u in e.units:
                out[unit_name(e.module_name, u)] = e.kind.matrix(e.module, u)
    return out


def entry_masks(entries: Mapping[str, Entry], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-unit keep-masks (from :func:`unit_scores`' keys) laid out back as per-entry masks."""
    out: dict[str, torch.Tensor] = {}
    for key, e in entries.items():
        if e.simple:
            out[key] = masks[key]
            continue
        if isinstance(e.kind, ConvKind):  # one concatenation, not a full-size mask per group
            out[key] = from_matrix(torch.cat([masks[unit_name(e.module_name, u)] for u in e.units]), e.param.shape)
            continue
        keep = torch.zeros(e.param.shape, dtype=torch.bool, device=e.param.device)
        for u in e.units:
            keep |= e.kind.weight_mask(e.module, masks[unit_name(e.module_name, u)], u)
        out[key] = keep
    return out


@torch.no_grad()
def unstructured_entry_masks(entries: Mapping[str, Entry], units: Mapping[str, torch.Tensor],
                             sparsity: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per-entry keep-masks pruning exactly ``round(s_u * n_u)`` lowest scores of every unit (ties
    by index), as :func:`~prunekit.sparsity.sharding.unstructured_masks` unit by unit; a grouped
    convolution's groups are ranked in one batched sort (a depthwise layer is hundreds of units)."""
    out: dict[str, torch.Tensor] = {}
    plain: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, e in entries.items():
        names = [key] if e.simple else [unit_name(e.module_name, u) for u in e.units]
        if isinstance(e.kind, ConvKind) and len(names) > 1:
            stacked = torch.stack([units[n].reshape(-1) for n in names])
            k = torch.tensor([keep_count(stacked.shape[1], sparsity[n]) for n in names], device=stacked.device)
            keep = topk_keep(stacked, k).view(len(names), *units[names[0]].shape)
            out.update(zip(names, keep.unbind(0)))
        else:
            plain.update((n, units[n]) for n in names)
    out.update(sharding.unstructured_masks(plain, {n: sparsity[n] for n in plain}))
    return entry_masks(entries, out)


def unit_modules(entries: Mapping[str, Entry]) -> dict[str, tuple[str, str]]:
    """``{unit name: (module name, unit)}`` of every unit, as ``prune()``'s plan holds them."""
    return {(key if e.simple else unit_name(e.module_name, u)): (e.module_name, u)
            for key, e in entries.items() for u in e.units}
