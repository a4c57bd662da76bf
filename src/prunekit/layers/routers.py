"""The routers of mixtures of experts: modules that choose experts, never pruning targets by default.

A router's few rows (one per expert, or one for Qwen2-MoE's ``shared_expert_gate``) decide which
weights every token uses; zeroing half of them changes the routing of every token and saves
nothing worth having, so :func:`prunekit.layers.targets.find_targets` leaves them out (naming one
in ``include=`` prunes it anyway) and :mod:`prunekit.oneshot.coverage` does not count them as
weights expected pruned. A module is a router when

* its class is a ``...Router`` (transformers 5's ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``), or
* it is named ``router`` or ``gate`` and its parent holds an ``experts`` child (the ``nn.Linear``
  router of older Mixtral code, ``block_sparse_moe.gate``; a ``gate`` elsewhere, e.g. a gated
  MLP's projection, is an ordinary layer), or
* it is named ``shared_expert_gate`` (Qwen2-MoE's ``[1, H]`` sigmoid gate of the shared expert).

The shared expert's own MLP is an ordinary target.
"""
from __future__ import annotations

from torch import nn

ROUTER_NAMES = ("router", "gate")
#: transformers' name of the scalar gate scaling a shared expert's output (Qwen2-MoE)
SHARED_GATE_NAMES = ("shared_expert_gate",)
ROUTER_REASON = ("router of a mixture of experts (it chooses the experts), left dense by default; name it in "
                 "include= to prune it")


def is_router(name: str, module: nn.Module, parent: nn.Module | None = None) -> bool:
    """Whether the module ``name`` (``parent``: the module holding it) is a router or a shared
    expert's gate (see the module's docstring)."""
    last = name.rpartition(".")[2]
    if "Router" in type(module).__name__ or last in SHARED_GATE_NAMES:
        return True
    return last in ROUTER_NAMES and parent is not None and isinstance(getattr(parent, "experts", None), nn.Module)


def is_listed_expert(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` lies inside one expert of older code's per-expert layout,
    ``<layer>.experts.<i>...`` where ``<layer>`` holds a router (:func:`is_router`): such an
    expert's forward runs only on the tokens routed to it, so with none it is never called."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part != "experts" or not parts[i + 1].isdigit():
            continue
        try:
            layer = model.get_submodule(".".join(parts[:i])) if i else model
        except AttributeError:
            return False
        prefix = ".".join(parts[:i])
        return any(is_router(f"{prefix}.{n}" if prefix else n, child, layer) for n, child in layer.named_children())
    return False


def parent_of(model: nn.Module, name: str) -> nn.Module | None:
    """The module holding ``name`` in ``model`` (None for the model itself or a missing one)."""
    if not name:
        return None
    owner = name.rpartition(".")[0]
    try:
        return model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
