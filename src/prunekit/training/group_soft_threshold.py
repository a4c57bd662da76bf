"""Group soft thresholding during training: the group-lasso proximal step on channels or neurons.

The threshold ``d_k`` (per unit of ``||w_g||_2 / sqrt(|g|)``) follows a LATS-family schedule of
:mod:`prunekit.training.schedules` from 0 to the final ``D`` exactly as :class:`SoftThreshold`'s does.
After each ``optimizer.step()`` every unit takes the proximal step of the increment,

    w_g <- w_g * max(0, 1 - tau_g / ||w_g||_2),   tau_g = (d_{k+1} - d_k) * sqrt(|g|),

which under SGD is ISTA on ``L(w) + sum_g lambda_k sqrt(|g|) ||w_g||_2`` with ``lr_k lambda_k =
d_{k+1} - d_k`` (the group form of the soft-threshold paper's ISTA view, arXiv 2302.13019, applied to
the stored weights like its greedy ablation). A unit whose norm falls to the threshold becomes exactly
zero and is removed for good (its readers' columns and optimizer state zeroed with it).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .base import broadcast_, world_size
from .group_base import GroupPrunerBase, check_fraction
from .schedules import ThresholdSchedule, check_window

KINDS = ("s_lats", "lats", "pgh", "linear", "sine")


class GroupSoftThreshold(GroupPrunerBase):
    """Group-lasso soft thresholding of CNN channels (``groups="channels"``, traced on ``example``)
    or transformer MLP neurons (``groups="mlp"``), stepped after every ``optimizer.step()``.

    ``schedule``: ``"s_lats"``, ``"lats"`` (needs ``steps_per_epoch``), ``"pgh"`` (needs ``beta``),
    or the non-adapted ``"linear"``/``"sine"``; the window is ``[start_step, total_steps)``. Give one of
    ``final_threshold=D`` (in units of ``||w_g||_2/sqrt(|g|)``), ``target`` (fraction of the units) or
    ``flops`` (fraction of the traced multiply-adds, channels only): with a target the pruner sets
    ``D = d_k + r`` every ``control_every`` steps, ``r`` the score of the unit at the target's edge
    (the shrinkage still to come then just removes it); the threshold stops rising once the target
    is met, and ``finalize()`` removes exactly the target's lowest-scored units (more if more
    already reached zero). A layer always keeps one unit.

    ``finalize()`` makes the model physically smaller; build a new optimizer afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        groups: str = "channels",
        example: Any = None,
        exclude=None,
        schedule: str = "s_lats",
        final_threshold: float | None = None,
        target: float | None = None,
        flops: float | None = None,
        start_step: int = 0,
        beta: float | None = None,
        steps_per_epoch: int | None = None,
        control_every: int = 10,
        auto_step: bool = False,
        sync: bool = True,
    ) -> None:
        check_window(total_steps, start_step)
        if schedule not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS} for group soft thresholding, got {schedule!r}")
        self.sched = ThresholdSchedule(schedule, total_steps, start_step, beta, steps_per_epoch)
        if sum(x is not None for x in (final_threshold, target, flops)) != 1:
            raise ValueError("give exactly one of final_threshold=D, target= (fraction of units) or flops= "
                             "(fraction of multiply-adds)")
        if final_threshold is not None and (isinstance(final_threshold, bool) or
                                            not isinstance(final_threshold, (int, float)) or final_threshold < 0):
            raise ValueError(f"final_threshold must be a number >= 0, got {final_threshold!r}")
        self.of = "flops" if flops is not None else "groups"
        self.target = None if final_threshold is not None else check_fraction(
            flops if flops is not None else target, self.of if flops is not None else "target")
        if isinstance(control_every, bool) or not isinstance(control_every, int) or control_every < 1:
            raise ValueError(f"control_every must be an integer >= 1, got {control_every!r}")
        name = "flops" if flops is not None else "target"
        super().__init__(model, optimizer, groups, example, exclude, sync,
                         None if self.target is None else (self.target, self.of, name))
        self.total_steps, self.start, self.control_every = total_steps, start_step, control_every
        self.D = float(final_threshold or 0.0)
        self.d = 0.0
        if self.target is not None:
            self._estimate_D()
        if auto_step:
            self._attach_auto_step()

    # -- threshold ---------------------------------------------------------------------------
    @torch.no_grad()
    def _estimate_D(self) -> None:
        scores = self.groups.scores(self.removed)
        chosen = self.groups.select(scores, self.target, self.of)
        edge = float(scores[chosen].max()) if bool(chosen.any()) else -1.0
        self.D = self.d + max(edge, 0.0)

    def _reached(self) -> bool:
        """With a target: True once it is met (the threshold then stops rising)."""
        if self.target is None:
            return False
        if self.of == "flops":
            return self.groups.flops_removed(self.removed) >= self.target
        return int(self.removed.sum()) >= round(self.target * self.groups.units)

    @property
    def threshold(self) -> float:
        """The current threshold ``d`` (per unit of ``||w_g||_2 / sqrt(|g|)``)."""
        return self.d

    @torch.no_grad()
    def prox_(self, tau: float) -> torch.Tensor:
        """One group-lasso proximal step with threshold ``tau`` (times ``sqrt(|g|)`` per unit);
        returns the units it zeroed. In a layer where every live unit would reach zero, the largest
        (the first of ties) is left as it is: a layer keeps one unit."""
        norms = self.groups.sq_norms().sqrt()
        t = tau * self.groups.sizes.sqrt()
        factor = torch.where(norms > t, 1 - t / norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        for site in self.groups.sites:  # a layer keeps one unit: its largest is spared if all would go
            span = slice(site.start, site.start + site.count)
            if not bool((factor[span] > 0).any()) and not bool(self.removed[span].all()):
                alive = torch.where(self.removed[span], -1.0, norms[span])
                factor[site.start + int(torch.argmax(alive))] = 1.0  # argmax: the first of ties
        self.groups.scale_(factor)
        return (factor == 0) & ~self.removed

    # -- public API --------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: re-zero removed units, raise the threshold and
        take the proximal step of its increment."""
        self._check_live()
        self._apply()
        k = self.step_count + 1
        if self.target is not None and k <= self.total_steps and (k % self.control_every == 0 or k == self.total_steps):
            self._estimate_D()
        new = self.d if self._reached() else max(self.d, self.D * self.sched(k))
        if self.sync and world_size() > 1:
            new = float(broadcast_(torch.tensor([new], dtype=torch.float64))[0])
        tau, self.d, self.step_count = new - self.d, new, k
        if tau > 0:
            dead = self.prox_(tau)
            if bool(dead.any()):
                self._set_removed(self.removed | dead)

    def _final_removed(self) -> None:
        if self.target is not None:
            self.removed = self.removed | self.groups.select(self.groups.scores(self.removed), self.target, self.of)

    def state_dict(self) -> dict[str, Any]:
        """Step, thresholds, removed units and configuration (the weights are the model's)."""
        return {**self._group_state(), "d": self.d, "D": self.D, "config": self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_group_state(state)
        if state["config"] != self._config():
            raise ValueError(f"pruner state_dict was made with {state['config']}, this pruner has {self._config()}")
        self._restore_removed(state)
        self.d, self.D = float(state["d"]), float(state["D"])

    def _config(self) -> dict[str, Any]:
        return {"schedule": repr(self.sched), "target": self.target, "of": self.of, "control_every": self.control_every}
