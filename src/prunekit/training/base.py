"""What every in-training pruner shares: targets, checks, step count, hooks, hygiene, DDP sync.

Under FSDP2 (``fully_shard``) the weights, their gradients and optimizer state are DTensors split
by rows; the pruners edit each rank's rows in place and compute budgets and thresholds over all
shards (:mod:`prunekit.sparsity.sharding`).

A pruner holds *all* its state (step, masks, thresholds); the model keeps its own parameters
under their own names, and the optimizer owns every pruned weight. ``step()`` is called once per
optimizer step, after ``optimizer.step()`` (or automatically with ``auto_step=True``, through an
optimizer post-step hook).
"""
from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..sparsity import sharding
from ..sparsity.allocation import allocate
from ..sparsity.masks import MaskSet
from ..layers.base import kind_of
from ..layers.targets import check_plain_weights, find_targets
from ..layers.targets import unwrap
from ..oneshot.pipeline import _warn_skipped as warn_skipped
from ..oneshot.plan import _skip_misfits
from ..sparsity.patterns import parse_pattern
from .entries import Entry, build_entries
from .shadow import shadow_weight, unshadow


def resolve_targets(model: nn.Module, targets: Mapping[str, nn.Module] | Sequence[str] | None,
                    pattern: Any = None, strict: bool = False) -> "OrderedDict[str, nn.Module]":
    """Prunable modules by name: ``prune()``'s rule by default (:func:`find_targets` over every
    registered layer kind: Linear, convolutions grouped or not, ``nn.MultiheadAttention``,
    transformers' ``Conv1D``), or the given names/modules. Layers that cannot hold ``pattern``
    (an N:M pattern the input dimension does not fit, a depthwise kernel) are left out with
    ``prune()``'s warning, or refused with its ValueError under ``strict=True``; nothing changes."""
    model = unwrap(model)[0]  # DDP and torch.compile: names as in the user's module
    if targets is None:
        out = find_targets(model, types=None)
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
    if targets is not None and not isinstance(targets, Mapping):  # names (group pruners pass their own mapping)
        _check_not_inside_a_kind(model, out)
    check_plain_weights(out)
    for name, module in out.items():
        try:
            kind_of(module)
        except TypeError:
            if not isinstance(getattr(module, "weight", None), nn.Parameter):
                raise TypeError(f"target {name!r} has no weight parameter") from None
    kinded = OrderedDict((n, m) for n, m in out.items() if _has_kind(m))
    skipped = _skip_misfits(kinded, parse_pattern(pattern or "unstructured"), strict)
    if skipped:
        warn_skipped(skipped)
        out = OrderedDict((n, m) for n, m in out.items() if n not in skipped)
    if not out:
        raise ValueError(f"no layer fits pattern {pattern}: {skipped}; use another pattern or pass targets=[...]")
    return out


def _check_not_inside_a_kind(model: nn.Module, out: Mapping[str, nn.Module]) -> None:
    """A target whose weight another layer kind writes in its own forward (attention's
    ``out_proj``, whose forward never runs) could be neither shadowed nor seen as prune() sees
    it: ValueError naming the module to target instead."""
    parents: dict[int, str] = {}
    for name, module in model.named_modules():
        if _has_kind(module):
            for pname, p in kind_of(module).parameters(module).items():
                if "." in pname:  # held by a submodule the kind reads from its own forward
                    parents[id(p)] = name
    for name, module in out.items():
        parent = parents.get(id(getattr(module, "weight", None)))
        if parent is not None and parent not in out:
            raise ValueError(f"target {name!r} is read by {parent!r} ({type(model.get_submodule(parent)).__name__}) "
                             f"in its own forward, never by its own; pass targets=[{parent!r}] (q, k, v and "
                             "out_proj are pruned together)")


def _has_kind(module: nn.Module) -> bool:
    try:
        kind_of(module)
    except TypeError:
        return False
    return True


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
    """Zero every per-entry optimizer buffer of ``param`` (momentum, Adam moments) where not ``keep``
    (``keep`` is this rank's part when ``param`` is sharded)."""
    keep = sharding.local(keep)
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            sharding.local(value).mul_(keep)


def magnitude_projection(scores: Mapping[str, torch.Tensor], sparsity: float, budget: str = "global") -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly ``round(sparsity * n)`` lowest scores (global or per layer)."""
    return sharding.unstructured_masks(scores, allocate(scores, sparsity, budget))


class PrunerBase(abc.ABC):
    """The interface of every in-training pruner, and what they share: targets, the optimizer-ownership
    check, the step count, hooks, the finalize guard and state checks.

    A pruner implements ``step()``, ``masks()``, ``state_dict()``/``load_state_dict()``,
    ``synchronize()`` (the torch.distributed agreement of its decisions) and ``_finalize()`` (the
    final weights); ``sparsity()`` and ``finalize()`` are written here once.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, targets=None, sync: bool = True,
                 pattern: Any = None, strict: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        self.model, self.optimizer, self.sync = model, optimizer, sync
        self.targets = resolve_targets(model, targets, pattern, strict)
        #: the parameters pruned, by name (:mod:`.entries`): the module's name for its only weight
        self.entries: "OrderedDict[str, Entry]" = build_entries(self.targets)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for key, e in self.entries.items():
            where = f"{e.module_name}.{e.attr}" if e.owner is e.module else key
            sharding.check_sharding(f"parameter {where}", e.param)
            if id(e.param) not in owned:
                raise ValueError(f"parameter {where} is not owned by the optimizer; create the optimizer "
                                 "over the model's parameters before the pruner")
        self._weights = OrderedDict((n, e.param) for n, e in self.entries.items())
        self.step_count = 0
        self.finalized = False
        self._hooks: list[Any] = []

    # -- the interface -----------------------------------------------------------------------
    @abc.abstractmethod
    def step(self) -> None:
        """Call once after every ``optimizer.step()`` (or pass ``auto_step=True``)."""

    @abc.abstractmethod
    def masks(self) -> MaskSet:
        """Boolean keep-masks of every prunable layer: True where the forward's weight survives."""

    def sparsity(self) -> float:
        """Fraction of prunable weights that are zero in the forward (outside :meth:`masks`)."""
        return self.masks().sparsity()

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit (the model and optimizer save their own state)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises before changing anything if it belongs elsewhere."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Make this pruner's decisions equal on every torch.distributed rank (a no-op in one process).

        ``step()`` calls it where the decisions are made when ``sync=True``.
        """

    def finalize(self) -> MaskSet:
        """Write the final sparse weights, detach every hook; returns the keep-masks. The model is a
        plain ``nn.Module`` afterwards, with the same state-dict keys."""
        self._check_live()
        self._remove_hooks()
        masks = self._finalize()
        self.finalized = True
        return masks

    @abc.abstractmethod
    def _finalize(self) -> MaskSet:
        """Write the final weights (hooks are already removed); return the keep-masks."""

    # -- shared machinery --------------------------------------------------------------------
    def _attach_auto_step(self) -> None:
        """Call ``self.step()`` from an optimizer post-step hook (registered last)."""
        self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self.step()))

    def _shadow(self, name: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run entry ``name``'s module forward on ``transform(weight)`` (see :func:`shadow_weight`)."""
        e = self.entries[name]
        self._hooks.extend(shadow_weight(e.module, transform, e.owner, e.attr))

    @property
    def weights(self) -> "OrderedDict[str, nn.Parameter]":
        """The prunable weights by layer name (for the soft-threshold pruners: the latent theta)."""
        return self._weights

    def _check_live(self) -> None:
        if self.finalized:
            raise RuntimeError(f"{type(self).__name__}.step() or finalize() called after finalize(); "
                               "the pruner is detached")

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for e in self.entries.values():
            unshadow(e.owner, e.attr)

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
