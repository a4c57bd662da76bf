"""What the group pruners share: the units, removed units kept at exactly zero through the
optimizer, masks, resume checks, and ``finalize()`` as physical surgery.

A removed unit's owned weights and its readers' columns are zero after every ``step()``; their
gradients are zeroed in an optimizer pre-step hook and their optimizer state (momentum, Adam
moments) is zeroed, so they stay exactly zero through SGD with momentum, Adam and AdamW.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..sparsity import sharding
from ..sparsity.masks import MaskSet
from ..structures.channel_budget import macs
from ..structures.surgery import Undo
from .base import PrunerBase, broadcast_, mask_optimizer_state, world_size
from .group_sets import GroupSet, build

OF = ("groups", "flops")


@dataclass
class GroupResult:
    """What ``finalize()`` removed: unit indices per layer (a channel group or an MLP), parameters
    and (channels) traced multiply-adds before and after, and the seconds the surgery took."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    units_before: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    seconds: float = 0.0

    @property
    def flops_removed(self) -> float | None:
        return None if not self.macs_before else 1 - self.macs_after / self.macs_before

    def summary(self) -> str:
        lines = [f"{name:40s} {n}->{n - len(self.removed[name])}" for name, n in self.units_before.items()]
        lines.append(f"parameters {self.params_before:,} -> {self.params_after:,}")
        if self.macs_before:
            lines.append(f"multiply-adds {self.macs_before:,} -> {self.macs_after:,} "
                         f"({100 * self.flops_removed:.1f}% fewer)")
        return "\n".join(lines)


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class GroupPrunerBase(PrunerBase):
    """Units from ``groups`` (``"channels"`` with ``example``/``exclude``, or ``"mlp"``), removed
    units held at zero, ``finalize()`` = surgery. Subclasses decide which units go."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, groups: str, example, exclude,
                 sync: bool, target: tuple[float, str, str] | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        gset = build(model, groups, example, exclude)
        if target is not None:  # (fraction, "groups"/"flops", the argument's name): reachable, or raise now
            gset.check_target(*target)
        modules = dict(model.named_modules())
        targets = OrderedDict((m, modules[m]) for m in dict.fromkeys(gset.module_of.values())
                              if isinstance(getattr(modules[m], "weight", None), nn.Parameter))
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name in gset.module_of:
            p = gset.params[name]
            if sharding.is_sharded(p):
                raise ValueError(f"parameter {name} is sharded (FSDP2); group pruners run on plain parameters only")
            if id(p) not in owned:
                raise ValueError(f"parameter {name} is not owned by the optimizer; create the optimizer over the "
                                 "model's parameters before the pruner")
        super().__init__(model, optimizer, targets, sync)
        self.groups: GroupSet = gset
        self.removed = torch.zeros(gset.units, dtype=torch.bool)
        self._keep: dict[str, torch.Tensor] = {}
        self.result: GroupResult | None = None
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._mask_grads()))

    # -- removed units stay zero -------------------------------------------------------------
    def _refresh_keep(self) -> None:
        self._keep = self.groups.keep(self.removed)

    @torch.no_grad()
    def _mask_grads(self) -> None:
        for name, keep in self._keep.items():
            g = self.groups.params[name].grad
            if g is not None:
                g.mul_(keep)

    @torch.no_grad()
    def _apply(self) -> None:
        for name, keep in self._keep.items():
            p = self.groups.params[name]
            p.masked_fill_(~keep, 0.0)  # +0.0 (a product would leave -0.0 behind)
            mask_optimizer_state(self.optimizer, p, keep)

    def _set_removed(self, removed: torch.Tensor) -> None:
        self.removed = removed.clone()
        if self.sync:
            self.synchronize()
        self._refresh_keep()
        self._apply()

    # -- public API --------------------------------------------------------------------------
    def masks(self) -> MaskSet:
        """Keep-masks of every touched layer's weight (after ``finalize()``: all True, the new shapes)."""
        out = {}
        for name, module in self.targets.items():
            key = f"{name}.weight"
            keep = None if self.finalized else self._keep.get(key)
            out[name] = keep.clone() if keep is not None else torch.ones_like(module.weight, dtype=torch.bool)
        return MaskSet(out)

    def group_sparsity(self) -> float:
        """Fraction of the units (channels or neurons) removed."""
        return float(self.removed.double().mean()) if self.removed.numel() else 0.0

    def flops_removed(self) -> float:
        """Fraction of the traced multiply-adds gone with the removed units (channels only)."""
        return self.groups.flops_removed(self.removed)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Replace every rank's removed units by rank 0's; a no-op in one process."""
        if world_size() > 1:
            self.removed = broadcast_(self.removed.to(torch.uint8)).bool()

    def finalize(self) -> GroupResult:  # type: ignore[override]
        """Remove the units physically: producers, BatchNorms and consumers become smaller in place
        (module names and ``state_dict`` keys stay), each layer keeping at least one unit. The
        optimizer still holds the old, larger parameters: **build a new optimizer** over
        ``model.parameters()`` to keep training. Returns a :class:`GroupResult`."""
        return super().finalize()

    @torch.no_grad()
    def _finalize(self) -> GroupResult:
        self._final_removed()
        self._refresh_keep()
        self._apply()
        g, start = self.groups, time.perf_counter()
        result = GroupResult(units_before={s.name: s.count for s in g.sites},
                             params_before=sum(p.numel() for p in self.model.parameters()))
        if g.graph is not None:
            result.macs_before = macs(g.graph)
        undo = Undo()
        try:
            result.removed = g.shrink(self.model, self.removed, undo)
        except BaseException:
            undo.restore()
            raise
        if g.graph is not None:
            result.macs_after = macs(g.graph, [len(result.removed[s.name]) for s in g.sites])
        result.params_after = sum(p.numel() for p in self.model.parameters())
        result.seconds = time.perf_counter() - start
        self.result = result
        return result

    def _final_removed(self) -> None:
        """Subclasses: settle ``self.removed`` before the surgery."""

    # -- state -------------------------------------------------------------------------------
    def _group_state(self) -> dict[str, Any]:
        return {**self._base_state(), "removed": self.removed.clone(), "units": self.groups.units,
                "sites": [(s.name, s.count) for s in self.groups.sites]}

    def _load_group_state(self, state: Mapping[str, Any]) -> None:
        """Check ``state`` fits (raises before changing anything), then restore the removed units."""
        self._check_state(state)
        mine = [(s.name, s.count) for s in self.groups.sites]
        if [tuple(s) for s in state["sites"]] != mine:
            raise ValueError(f"pruner state_dict has other units ({state['sites'][:3]}...), this pruner {mine[:3]}...")

    def _restore_removed(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.removed = state["removed"].clone().bool()
        self._refresh_keep()
