"""Mixture-of-experts layers: where the experts are, and how whole experts are taken out.

Recognised from the module layout, not from class names: a module with a router child (``gate``
or ``router``: a 2-D ``weight`` with one row per expert) and an ``experts`` child whose expert
weights are fused 3-D parameters with the expert first (``gate_up_proj`` ``[E, 2I, H]`` or
``up_proj``, and ``down_proj`` ``[E, H, I]``), as transformers 5 builds Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE. Removing experts index-selects every parameter and buffer of the router and
of the experts whose first dimension is the expert count, in place (module names and
``state_dict`` keys stay), and sets the modules' expert counts; a Qwen2-MoE ``shared_expert`` is
another child of the layer and is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .surgery import Undo

ROUTER_NAMES = ("gate", "router")
#: integer attributes holding the expert count, updated on the layer, its router and its experts
COUNT_ATTRS = ("num_experts", "num_local_experts", "out_features")


@dataclass(frozen=True)
class ExpertSite:
    """One MoE layer: ``owner`` (``model.layers.0.mlp``), its ``router`` and ``experts`` modules,
    ``num_experts`` experts, ``top_k`` of them chosen per token."""

    owner: str
    router: str
    experts: str
    num_experts: int
    top_k: int


def _fused_experts(module: nn.Module | None) -> int | None:
    """The expert count of a fused experts module (3-D ``down_proj`` and ``gate_up_proj``/``up_proj``), else None."""
    if module is None:
        return None
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    if not all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (down, up)) or down.shape[0] != up.shape[0]:
        return None
    return down.shape[0]


def _site(name: str, module: nn.Module, config) -> ExpertSite | None:
    experts = getattr(module, "experts", None)
    count = _fused_experts(experts)
    if count is None:
        return None
    for router_name in ROUTER_NAMES:
        router = getattr(module, router_name, None)
        weight = getattr(router, "weight", None)
        if isinstance(router, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.shape[0] == count:
            break
    else:
        return None
    top_k = next((v for v in (getattr(router, "top_k", None), getattr(module, "top_k", None),
                              getattr(config, "num_experts_per_tok", None)) if isinstance(v, int)), None)
    if top_k is None:
        return None
    prefix = f"{name}." if name else ""
    return ExpertSite(name, prefix + router_name, prefix + "experts", count, top_k)


def find_experts(model: nn.Module) -> list[ExpertSite]:
    """Every recognised mixture-of-experts layer of ``model``, in module order."""
    config = getattr(model, "config", None)
    return [s for name, module in model.named_modules() if (s := _site(name, module, config)) is not None]


def _select(module: nn.Module, count: int, index: torch.Tensor, undo: Undo) -> None:
    """Keep entries ``index`` of the first dimension of every direct parameter and buffer that
    has ``count`` there."""
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == count:
            kept = p.detach()[index.to(p.device)].contiguous()
            undo.set(module, name, nn.Parameter(kept, requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == count:
            undo.set(module, name, b[index.to(b.device)].contiguous())


def remove_experts(model: nn.Module, site: ExpertSite, keep: list[int], undo: Undo) -> None:
    """Keep only experts ``keep`` (sorted indices) of ``site``: router rows, expert weights and
    the expert counts of the layer, router and experts modules. Every change is logged in ``undo``."""
    if len(keep) < site.top_k:
        raise ValueError(f"{site.owner}: keeping {len(keep)} experts is fewer than the {site.top_k} each token "
                         "is routed to")
    index = torch.tensor(keep, dtype=torch.long)
    modules = [model.get_submodule(n) for n in (site.owner, site.router, site.experts)]
    for module in modules[1:]:
        _select(module, site.num_experts, index, undo)
    for module in modules:
        for attr in COUNT_ATTRS:
            if getattr(module, attr, None) == site.num_experts and not isinstance(getattr(module, attr), bool):
                undo.set(module, attr, len(keep))
