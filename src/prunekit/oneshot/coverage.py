"""What one ``prune()`` call is expected to prune, and the count behind ``result.sparsity``.

A user asking for 50% expects the weights of the model's layers to be half zero, whatever
their layout. The weights *expected pruned* are

* every parameter a layer kind of a target writes, pruned or left dense (a pattern it cannot
  hold, a forward never called), and
* every other parameter of two or more dimensions inside the calibrated blocks (or the whole
  model when it is one block) that no layer kind handles: a weight used functionally, fused
  experts in a layout :mod:`prunekit.layers.experts` does not read (transposed, with biases), ...
  Each is a *gap*, left dense and listed with its reason
  (``strict=True``: an error, before anything changes).

Left out, as the user's own choice or by the rule of :mod:`prunekit.layers.targets`: the head
(unless ``include_head``), layers ``include``/``exclude``/``types`` leave out (a gap whose path
``exclude`` matches, or ``include`` does not, too), embeddings and weights tied to them, and the
routers of mixtures of experts and shared-expert gates (:func:`prunekit.layers.routers.is_router`).
``result.sparsity`` is the fraction of zeros over the expected weights, counted on the tensors
after pruning; the pruned layers' own sparsity is beside it (``result.layers_sparsity``).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..layers.routers import is_router, parent_of
from ..layers.targets import as_patterns, find_targets
from .runtime.offload import Storage, _offload_hook

__all__ = ["count_zeros", "find_gaps", "is_router"]


def find_gaps(model: nn.Module, blocks: Iterable[tuple[str, nn.Module]], include=None, exclude=None) -> dict[str, str]:
    """``{parameter path: why it is left dense}`` for every parameter of two or more dimensions
    inside ``blocks`` that no registered layer kind handles (see the module's docstring)."""
    # every layer kind's modules, whatever the options chose (attention's out_proj included), and embeddings
    kinds = find_targets(model, types=None, include_head=True).values()
    handled = {id(p) for m in kinds for p in m.parameters()}
    handled |= {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                for p in m.parameters()}
    inc, exc = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    modules = dict(model.named_modules())
    gaps: dict[str, str] = {}
    seen: set[int] = set()
    for bname, block in blocks:
        for pname, p in block.named_parameters():
            path = f"{bname}.{pname}" if bname else pname
            if p.dim() < 2 or id(p) in handled or id(p) in seen:
                continue
            seen.add(id(p))
            if (inc and not any(r.search(path) for r in inc)) or any(r.search(path) for r in exc):
                continue
            owner_name = path.rpartition(".")[0]
            owner = modules.get(owner_name, model)
            if is_router(owner_name, owner, parent_of(model, owner_name)):
                continue
            gaps[path] = (f"a {p.dim()}-D parameter {tuple(p.shape)} of {type(owner).__name__} that no layer kind "
                          "handles (fused experts, or a weight used functionally)")
    return gaps


def count_zeros(model: nn.Module, storage: Storage, gaps: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """``{parameter path: (zeros, numel)}`` over the expected weights: every target's (read where
    it is stored, offloaded ones included) and every gap's, as the tensors hold them now."""
    out = {path: _count(storage.read(path)) for path in storage.params}
    params = dict(model.named_parameters(remove_duplicate=False))
    for path in gaps:
        out[path] = _count(_read(model, path, params[path]))
    return out


def _count(t: torch.Tensor) -> tuple[int, int]:
    return int((t == 0).sum()), t.numel()


def _read(model: nn.Module, path: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter's values: the tensor itself, or, offloaded by accelerate (on the meta
    device), its copy in the offload storage of the module or ancestor that holds it."""
    if not param.is_meta:
        return param.detach()
    modules = dict(model.named_modules())
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = _offload_hook(modules[".".join(parts[:cut])])
        if hook is not None:
            return hook.weights_map[".".join(parts[cut:])]
    raise ValueError(f"parameter {path!r} is on the meta device and in no offload storage; materialise the model")
