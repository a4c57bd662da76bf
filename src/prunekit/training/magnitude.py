"""Magnitude pruning on a sparsity schedule: one-shot + fine-tune, GMP (cubic), cyclical, any function.

Each step, after ``optimizer.step()`` (gradual pruning as in Zhu & Gupta 2017, arXiv 1710.01878, with
the mask resets of cyclical pruning, Srinivas et al. 2022, arXiv 2202.01290):

* ``w <- w*m`` and the optimizer's per-entry state (momentum, Adam moments) ``<- *m`` (gradients of
  pruned entries are also masked in an optimizer pre-step hook), so pruned weights stay exactly 0;
* ``s <- schedule(step)``; if ``s`` dropped (a new cycle) every mask re-opens; if it rose, the new
  mask is the old one AND the top ``1-s`` of ``|w*m|`` -- exact counts, ties by index, so masks never
  gain entries inside a cycle.

``mode="zero"`` re-introduces weights at 0; ``mode="keep"`` gives them back the value they had when
they were pruned (what a mask-in-forward implementation does). Either way they restart with zero
optimizer state.

Under FSDP2 every rank edits its own rows of each weight; budgets count over all shards, so the
masks equal an unsharded run's (:mod:`prunekit.sparsity.sharding`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..sparsity import sharding
from ..sparsity.allocation import BUDGETS, allocate, check_sparsity
from ..sparsity.masks import MaskSet
from ..sparsity.patterns import NM, parse_pattern
from .schedules import Constant
from ..oneshot.plan import _spread_within_modules as spread_within_modules
from .base import PrunerBase, broadcast_, mask_optimizer_state, world_size
from .entries import entry_masks, unit_modules, unit_scores, unstructured_entry_masks


class MagnitudePruner(PrunerBase):
    """Prune by magnitude following ``schedule`` (a float, a schedule from :mod:`prunekit.training.schedules`
    or any ``step -> sparsity`` function, sampled every ``every`` steps).

    ``pattern``: ``"unstructured"`` or ``"N:M"`` (the schedule must then end at ``1 - N/M``; a ramp
    keeps ``M - round(s*M)`` of every ``M``). ``budget``: ``"uniform"``, ``"global"`` or ``"erk"``
    per-layer allocation (with ``cap`` / ``overrides``, see :func:`prunekit.allocate`).

    The layers are ``prune()``'s (every registered layer kind), and budgets count on its units:
    ``nn.MultiheadAttention``'s q, k, v and out_proj each, a grouped convolution's groups with
    their counts spread so the layer prunes exactly ``round(s * n)``, transformers' ``Conv1D`` on
    its transposed weight. A layer that cannot hold ``pattern`` (a 3-channel stem under 2:4, a
    depthwise kernel) is left dense with ``prune()``'s warning when the pruner is built;
    ``strict=True`` raises there instead.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: float | Callable[[int], float],
        *,
        pattern: str | NM = "unstructured",
        budget: str = "uniform",
        cap: float | None = None,
        overrides: Mapping[str, float] | None = None,
        mode: str = "zero",
        every: int = 1,
        targets=None,
        auto_step: bool = False,
        sync: bool = True,
        masks: MaskSet | Mapping[str, torch.Tensor] | None = None,
        strict: bool = False,
    ) -> None:
        self.schedule = Constant(schedule) if isinstance(schedule, (int, float)) else schedule
        if not callable(self.schedule):
            raise TypeError(f"schedule must be a sparsity, a schedule or a step -> sparsity function, got {schedule!r}")
        self.pattern = parse_pattern(pattern)
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if isinstance(self.pattern, NM):
            if budget != "uniform" or overrides or cap is not None:
                raise ValueError("an N:M pattern fixes every layer's sparsity; use budget='uniform' without cap/overrides")
            final = getattr(self.schedule, "final", None)
            if final is not None and abs(final - self.pattern.sparsity) > 1e-9:
                raise ValueError(f"N:M pattern {self.pattern} means sparsity {self.pattern.sparsity}, "
                                 f"but the schedule ends at {final}")
        if mode not in ("zero", "keep"):
            raise ValueError(f"mode must be 'zero' or 'keep', got {mode!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self._sparsity_at(0)  # validates the schedule before anything is touched
        super().__init__(model, optimizer, targets, sync, self.pattern, strict)
        self.budget, self.cap, self.overrides, self.mode = budget, cap, overrides, mode
        self._masks = MaskSet({n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()})
        self.latent = {n: torch.zeros_like(w) for n, w in self.weights.items()} if mode == "keep" else {}
        self.s_prev = 0.0
        if masks is not None:  # resume sparse fine-tuning, e.g. from prunekit.load_masks(path)
            self._load_masks(dict(masks.items()))
            self.s_prev = self._sparsity_at(0)
        self.cycle_stats: list[dict[str, float]] = []
        self._last_end: dict[str, torch.Tensor] | None = None
        self._refresh_keep()
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._mask_grads()))
        if masks is None:
            self._update(0)
        else:
            self._apply()
        if auto_step:
            self._attach_auto_step()

    # -- schedule and masks ------------------------------------------------------------------
    def _sparsity_at(self, step: int) -> float:
        s = self.schedule(self.every * (step // self.every))
        return check_sparsity(float(s), f"schedule({step})")

    def _load_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Masks from a state dict or a file; full (unsharded) masks are split like the weights."""
        self._masks.load_state_dict(masks)
        for n, w in self.weights.items():
            self._masks[n] = sharding.shard_like(w, self._masks[n])

    def _refresh_keep(self) -> None:
        """This rank's part of every mask that prunes something, in the weights' dtype."""
        local = {n: sharding.local(m) for n, m in self._masks.items()}
        self._keep = {n: m.to(self.weights[n].dtype) for n, m in local.items() if not bool(m.all())}

    @torch.no_grad()
    def _new_masks(self, s: float) -> dict[str, torch.Tensor]:
        scores = {n: sharding.like(w, torch.where(sharding.local(self._masks[n]), sharding.local(w).abs(), -1.0))
                  for n, w in self.weights.items()}
        if isinstance(self.pattern, NM):
            m = self.pattern.m
            k = max(m - round(s * m), self.pattern.n)
            if k == m:
                return {n: torch.ones_like(self._masks[n]) for n in scores}
        units = unit_scores(self.entries, scores)
        if isinstance(self.pattern, NM):
            return entry_masks(self.entries, sharding.nm_masks(units, NM(k, m)))
        per_unit = allocate(units, s, self.budget, cap=self.cap, overrides=self.overrides)
        per_unit = spread_within_modules(per_unit, unit_modules(self.entries), {u: t.numel() for u, t in units.items()})
        return unstructured_entry_masks(self.entries, units, per_unit)

    @torch.no_grad()
    def _update(self, step: int) -> None:
        s = self._sparsity_at(step)
        if s < self.s_prev:  # a new cycle: re-open every mask
            self._record_cycle(step)
            for n, w in self.weights.items():
                if self.mode == "keep":
                    lw = sharding.local(w)
                    lw.copy_(torch.where(sharding.local(self._masks[n]), lw, sharding.local(self.latent[n])))
                    self.latent[n].zero_()
                self._masks[n] = torch.ones_like(self._masks[n])
        elif s > self.s_prev:
            old = dict(self._masks.items())
            for n, new in self._new_masks(s).items():
                self._masks[n] = new & old[n]
            if self.sync:
                self.synchronize()
            if self.mode == "keep":
                for n, w in self.weights.items():
                    self.latent[n] = torch.where(old[n] & ~self._masks[n], w, self.latent[n])
        else:
            return
        self.s_prev = s
        self._refresh_keep()
        self._apply()

    @torch.no_grad()
    def _mask_grads(self) -> None:
        for n, keep in self._keep.items():
            g = self.weights[n].grad
            if g is not None:
                sharding.local(g).mul_(keep)

    @torch.no_grad()
    def _apply(self) -> None:
        for n, keep in self._keep.items():
            w = self.weights[n]
            sharding.local(w).masked_fill_(keep == 0, 0.0)  # +0.0 (a product would leave -0.0 behind)
            mask_optimizer_state(self.optimizer, w, keep)

    def _record_cycle(self, step: int) -> None:
        """Recovery R_c and mask Hamming distance between consecutive cycle ends."""
        end = {n: m.clone() for n, m in self._masks.items()}
        if self._last_end is not None:
            pruned = sharding.count_true(~p for p in self._last_end.values())
            back = sharding.count_true(~self._last_end[n] & end[n] for n in end)
            ham = sharding.count_true(self._last_end[n] ^ end[n] for n in end)
            self.cycle_stats.append({"step": step, "recovery": back / max(pruned, 1), "hamming": ham})
        self._last_end = end

    # -- public API --------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: re-zero pruned entries, advance the schedule."""
        self._check_live()
        self._apply()
        self.step_count += 1
        self._update(self.step_count)

    def masks(self) -> MaskSet:
        """A copy of the current keep-masks, a :class:`~prunekit.MaskSet`."""
        return MaskSet(self._masks.state_dict())

    @torch.no_grad()
    def synchronize(self) -> None:
        """Replace every rank's masks by rank 0's; a no-op in one process. Masks sharded by FSDP2
        are left alone: each rank owns its rows, decided from counts over all shards."""
        if world_size() > 1:
            for n, m in list(self._masks.items()):
                if not sharding.is_sharded(m):
                    self._masks[n] = broadcast_(m.to(torch.uint8)).bool()  # a new tensor: no caller's mask changes
            self._refresh_keep()

    def _finalize(self) -> MaskSet:
        """Zero the pruned weights for good; returns the final masks."""
        self._apply()
        self._record_cycle(self.step_count)
        return MaskSet(self._masks.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "masks": self._masks.state_dict(), "s_prev": self.s_prev,
                "latent": {n: t.clone() for n, t in self.latent.items()}, "mode": self.mode,
                "pattern": str(self.pattern), "budget": self.budget, "schedule": _describe(self.schedule),
                # the same keys at every step, as torch.distributed.checkpoint loads into a fresh pruner's
                # state_dict(): the cycle records as one tuple, the last cycle's masks always present
                "cycle_stats": tuple(dict(c) for c in self.cycle_stats),
                "has_last_end": self._last_end is not None,
                "last_end": {n: m.clone() for n, m in (self._last_end or self._masks).items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        for key, mine in (("mode", self.mode), ("pattern", str(self.pattern)), ("budget", self.budget)):
            if state[key] != mine:
                raise ValueError(f"pruner state_dict has {key}={state[key]!r}, this pruner has {mine!r}")
        mine = _describe(self.schedule)
        if mine is not None and state["schedule"] is not None and state["schedule"] != mine:
            raise ValueError(f"pruner state_dict was made with schedule {state['schedule']}, this pruner has {mine}")
        self._load_masks(state["masks"])
        self.latent = {n: sharding.shard_like(self.weights[n], t.clone()) for n, t in state["latent"].items()}
        self.step_count, self.s_prev = int(state["step"]), float(state["s_prev"])
        self.cycle_stats = [dict(c) for c in state["cycle_stats"]]
        if state.get("has_last_end", state["last_end"] is not None):
            self._last_end = {n: sharding.shard_like(self.weights[n], m.clone()) for n, m in state["last_end"].items()}
        else:
            self._last_end = None
        self._refresh_keep()


def _describe(schedule: Callable) -> str | None:
    """A stable description of a schedule object (None for plain functions)."""
    return repr(schedule) if dataclasses.is_dataclass(schedule) else None

