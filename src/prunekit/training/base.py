"""What every in-training pruner shares: targets, checks, step count, hooks, hygiene, DDP sync.

A pruner holds *all* its state (step, masks, thresholds); the model keeps its own parameters
under their own names, and the optimizer owns every pruned weight. ``step()`` is called once per
optimizer step, after ``optimizer.step()`` (or automatically with ``auto_step=True``, through an
optimizer post-step hook).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..allocation import allocate
from ..patterns import unstructured_mask
from ..targets import find_targets


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def resolve_targets(model: nn.Module, targets: Mapping[str, nn.Module] | Sequence[str] | None) -> "OrderedDict[str, nn.Module]":
    """Prunable modules by name: :func:`find_targets` by default, or the given names/modules."""
    model = unwrap(model)
    if targets is None:
        out = find_targets(model)
    elif isinstance(targets, Mapping):
        out = OrderedDict(targets)
    else:
        modules = dict(model.named_modules())
        missing = [n for n in targets if n not in modules]
        if missing:
            raise ValueError(f"targets {missing[:5]} are not modules of the model")
        out = OrderedDict((n, modules[n]) for n in targets)
    if not out:
        raise ValueError("no prunable layers found; pass targets=[...] module names")
    for name, module in out.items():
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise TypeError(f"target {name!r} has no weight parameter")
    return out


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Make ``tensor`` equal to rank 0's on every rank (no-op without torch.distributed)."""
    if world_size() > 1:
        buf = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        dist.broadcast(buf, src=0)
        if buf is not tensor:
            tensor.copy_(buf.bool())
    return tensor


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero every per-entry optimizer buffer of ``param`` (momentum, Adam moments) where not ``keep``."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.mul_(keep)


def magnitude_projection(scores: Mapping[str, torch.Tensor], sparsity: float, budget: str = "global") -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly ``round(sparsity * n)`` lowest scores (global or per layer)."""
    per_layer = allocate(scores, sparsity, budget)
    return {n: unstructured_mask(scores[n], per_layer[n]) for n in scores}


def drop_forward_weight(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: remove the per-forward weight that shadowed the parameter."""
    module.__dict__.pop("weight", None)


class PrunerBase:
    """Targets, optimizer-ownership check, step count, hooks, finalize guard, state checks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, targets=None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.targets = resolve_targets(model, targets)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, module in self.targets.items():
            if id(module.weight) not in owned:
                raise ValueError(f"parameter {name}.weight is not owned by the optimizer; create the optimizer "
                                 "over the model's parameters before the pruner")
        self._weights = OrderedDict((n, m.weight) for n, m in self.targets.items())
        self.step_count = 0
        self.finalized = False
        self._hooks: list[Any] = []

    def _attach_auto_step(self) -> None:
        """Call ``self.step()`` from an optimizer post-step hook (registered last)."""
        self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self.step()))

    @property
    def weights(self) -> "OrderedDict[str, nn.Parameter]":
        """The prunable weights by layer name (for the soft-threshold pruners: the latent theta)."""
        return self._weights

    def _check_live(self) -> None:
        if self.finalized:
            raise RuntimeError(f"{type(self).__name__}.step() called after finalize(); the pruner is detached")

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(w.shape) for n, w in self.weights.items()}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Raise (before anything changes) if ``state`` belongs to another model or pruner."""
        if state.get("pruner") != type(self).__name__:
            raise ValueError(f"state_dict is from a {state.get('pruner')!r} pruner, not {type(self).__name__}")
        theirs, ours = state.get("shapes", {}), self._shapes()
        if theirs != ours:
            diff = sorted(set(theirs) ^ set(ours)) or [n for n in ours if theirs[n] != ours[n]]
            raise ValueError(f"pruner state_dict is from a different model: prunable layers differ at {diff[:5]}")

    def _base_state(self) -> dict[str, Any]:
        return {"pruner": type(self).__name__, "shapes": self._shapes(), "step": self.step_count}
