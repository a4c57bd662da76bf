"""Group magnitude pruning during training: CNN channels or MLP neurons on a GMP or cyclical schedule.

Each step, after ``optimizer.step()``: removed units are re-zeroed (weights, readers' columns,
optimizer state; gradients in a pre-step hook); ``s <- schedule(step)``; if ``s`` rose, the units of
lowest ``||w_g||_2 / sqrt(|g|)`` are removed until ``s`` of the units (``of="groups"``) or of the
traced multiply-adds (``of="flops"``) are gone -- removed units rank first, so none comes back inside
a cycle; if ``s`` dropped (a new cycle of :class:`~prunekit.training.schedules.Cyclical`), every unit
comes back with the values it had when it was removed (a unit re-introduced at zero would get zero
gradients: its producers feed readers whose columns are zero, and the other way round).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..sparsity.allocation import check_sparsity
from .group_base import OF, GroupPrunerBase
from .schedules import Constant


class GroupMagnitudePruner(GroupPrunerBase):
    """Remove CNN channels (``groups="channels"``, traced on ``example``) or transformer MLP neurons
    (``groups="mlp"``) by group norm following ``schedule``: a fraction, :func:`~prunekit.Cubic`
    (GMP), :class:`~prunekit.Cyclical` or any ``step -> fraction`` function, sampled every ``every``
    steps; the fraction is of the units (``of="groups"``) or of the multiply-adds (``of="flops"``).
    Every layer keeps at least one unit. ``finalize()`` makes the model physically smaller; build a
    new optimizer afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: float | Callable[[int], float],
        *,
        groups: str = "channels",
        example: Any = None,
        exclude=None,
        of: str = "groups",
        every: int = 1,
        auto_step: bool = False,
        sync: bool = True,
    ) -> None:
        self.schedule = Constant(schedule) if isinstance(schedule, (int, float)) and not isinstance(schedule, bool) \
            else schedule
        if not callable(self.schedule):
            raise TypeError(f"schedule must be a fraction, a schedule or a step -> fraction function, got {schedule!r}")
        if of not in OF:
            raise ValueError(f"of must be one of {OF}, got {of!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.of, self.every = of, every
        first = self._fraction_at(0)  # validates the schedule before anything is touched
        final = getattr(self.schedule, "final", None)
        super().__init__(model, optimizer, groups, example, exclude, sync,
                         (max(first, final if final is not None else 0.0), of, "the schedule's final fraction"))
        self.s_prev = 0.0
        self.latent = {name: torch.zeros_like(p) for name, p in self.groups.params.items()
                       if name in self.groups.module_of}
        self._update(0)
        if auto_step:
            self._attach_auto_step()

    def _fraction_at(self, step: int) -> float:
        s = self.schedule(self.every * (step // self.every))
        return check_sparsity(float(s), f"schedule({step})")

    @torch.no_grad()
    def _update(self, step: int) -> None:
        s = self._fraction_at(step)
        if s < self.s_prev:  # a new cycle: every unit comes back as it was when removed
            for name, keep in self._keep.items():
                p = self.groups.params[name]
                p.copy_(torch.where(keep, p, self.latent[name]))
                self.latent[name].zero_()
            self.removed = torch.zeros_like(self.removed)
            self._refresh_keep()
        elif s > self.s_prev:
            old = dict(self._keep)
            new = self.removed | self.groups.select(self.groups.scores(self.removed), s, self.of)
            for name, keep in self.groups.keep(new).items():
                was = old.get(name, torch.ones_like(keep))
                p = self.groups.params[name]
                self.latent[name] = torch.where(was & ~keep, p.detach(), self.latent[name])
            self._set_removed(new)
        self.s_prev = s

    # -- public API --------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: re-zero removed units, advance the schedule."""
        self._check_live()
        self._apply()
        self.step_count += 1
        self._update(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {**self._group_state(), "s_prev": self.s_prev, "of": self.of, "schedule": _describe(self.schedule),
                "latent": {n: t.clone() for n, t in self.latent.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_group_state(state)
        if state["of"] != self.of:
            raise ValueError(f"pruner state_dict has of={state['of']!r}, this pruner has {self.of!r}")
        mine = _describe(self.schedule)
        if mine is not None and state["schedule"] is not None and state["schedule"] != mine:
            raise ValueError(f"pruner state_dict was made with schedule {state['schedule']}, this pruner has {mine}")
        self._restore_removed(state)
        self.s_prev = float(state["s_prev"])
        self.latent = {n: t.clone() for n, t in state["latent"].items()}


def _describe(schedule: Callable) -> str | None:
    return repr(schedule) if dataclasses.is_dataclass(schedule) else None
