"""Soft-threshold pruning during training: the LATS family (Chen et al., ICLR 2023, arXiv 2302.13019).

The optimizer owns the dense latent ``theta`` (still the module's own ``weight``); the forward uses
``w = sign(theta) * relu(|theta| - d) = theta - clamp(theta, -d, d)`` with a straight-through
backward (``dL/dtheta := dL/dw``), so pruned entries keep receiving gradients and can regrow.
Under SGD this is lazy ISTA on ``L(w) + lambda_k |w|_1`` with ``d_{k+1} - d_k = lr_k * lambda_k``.
The threshold ``d`` is a scalar (one for all layers, or one per layer) set after every
``optimizer.step()`` from a schedule in :mod:`prunekit.training.schedules` and reaches the forward as a
0-dim tensor filled in place (a Python float would make ``torch.compile`` recompile at every change);
``finalize()`` writes ``weight = S_D(theta)`` and detaches everything. Under FSDP2 the target's
threshold is the k-th magnitude over all shards (:mod:`prunekit.sparsity.sharding`).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..sparsity import sharding
from ..sparsity.allocation import BUDGETS, allocate, check_sparsity
from ..sparsity.masks import MaskSet
from .schedules import ThresholdSchedule, check_window, exact_lats
from .base import PrunerBase, broadcast_, magnitude_projection, world_size


class SoftThreshold(PrunerBase):
    """Soft-threshold pruning with a threshold schedule (Chen et al. 2023, arXiv 2302.13019).

    ``schedule``: ``"s_lats"``, ``"lats"`` (per epoch; needs ``steps_per_epoch``), ``"exact_lats"``
    (increments ``lambda * lr`` actually used; ``lambda = D / sum(lr_fn(k))`` or ``lam`` given),
    ``"pgh"`` (needs ``beta``; ``beta < 1`` prunes early), ``"constant"`` (``shift_init=True`` is the
    reference's ``theta_0 = sign(w)(|w| + D)``), and the non-adapted baselines ``"linear"``, ``"sine"``.
    The window is ``[start_step, total_steps)``; ``d`` reaches the final threshold exactly at its end.

    The final threshold is ``final_threshold`` (a float: one global ``d``; a ``{layer: D}`` mapping:
    per-layer ``d``). **prunekit extension** (off in faithful reproductions): give
    ``target_sparsity`` instead and the pruner estimates ``D`` every ``control_every`` steps as the
    magnitude of ``|theta|`` at that sparsity (``budget="global"``: one ``d``; ``"uniform"``/``"erk"``:
    per-layer), keeping ``d`` non-decreasing; ``project=True`` then makes ``finalize()`` hit the
    target count exactly by magnitude. ``greedy=True`` is the greedy proximal ablation (stored
    weights shrunk by ``Delta d`` after each step, no latent memory).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        schedule: str = "s_lats",
        final_threshold: float | Mapping[str, float] | None = None,
        target_sparsity: float | None = None,
        budget: str = "global",
        start_step: int = 0,
        beta: float | None = None,
        steps_per_epoch: int | None = None,
        lr_fn: Callable[[int], float] | None = None,
        lam: float | None = None,
        control_every: int = 10,
        project: bool = False,
        greedy: bool = False,
        shift_init: bool = False,
        targets=None,
        auto_step: bool = False,
        sync: bool = True,
    ) -> None:
        check_window(total_steps, start_step)
        self.kind = schedule
        self.sched = ThresholdSchedule(schedule, total_steps, start_step, beta, steps_per_epoch)
        given = [x is not None for x in (final_threshold, target_sparsity, lam)]
        if sum(given) != 1:
            raise ValueError("give exactly one of final_threshold=D, target_sparsity=s (extension) "
                             "or lam=lambda (exact_lats only)")
        if lam is not None and schedule != "exact_lats":
            raise ValueError("lam=lambda is only for schedule='exact_lats'; other schedules take final_threshold")
        if schedule == "exact_lats" and lam is None and lr_fn is None:
            raise ValueError("exact_lats with a final threshold needs lr_fn(step) -> learning rate to sum the "
                             "learning rates in advance, or lam=lambda")
        if target_sparsity is not None:
            check_sparsity(target_sparsity, "target_sparsity")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if project and target_sparsity is None:
            raise ValueError("project=True needs target_sparsity")
        if shift_init and (schedule != "constant" or not isinstance(final_threshold, (int, float))):
            raise ValueError("shift_init belongs to schedule='constant' with a float final_threshold only")
        if not isinstance(control_every, int) or control_every < 1:
            raise ValueError(f"control_every must be an integer >= 1, got {control_every!r}")
        super().__init__(model, optimizer, targets, sync)
        names = list(self.weights)  # one threshold per pruned parameter (attention: in_proj_weight, out_proj.weight)
        if isinstance(final_threshold, Mapping):
            if set(final_threshold) != set(names):
                raise ValueError(f"final_threshold keys must be the prunable layers {names}")
            self.D = {n: float(final_threshold[n]) for n in names}
        else:
            self.D = {n: float(final_threshold or 0.0) for n in names}
        if any(v < 0 for v in self.D.values()) or (lam is not None and lam < 0):
            raise ValueError("thresholds and lam must be >= 0")
        self.total_steps, self.start, self.lam, self.target = total_steps, start_step, lam, target_sparsity
        self.budget, self.control_every, self.project, self.greedy = budget, control_every, project, greedy
        self.lr_total = sum(float(lr_fn(k)) for k in range(start_step, total_steps)) if lr_fn is not None else 0.0
        self.lr_sum = 0.0
        self.d = {n: 0.0 for n in names}
        # the forward reads d from 0-dim tensors filled in place: one torch.compile graph serves the run
        self._d_live = {n: torch.zeros((), dtype=w.dtype, device=w.device) for n, w in self.weights.items()}
        self.last_lambda = 0.0
        self._lr_used: float | None = None
        owner = self.weights[names[0]]
        self._group = next(i for i, g in enumerate(optimizer.param_groups) if any(p is owner for p in g["params"]))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self._snapshot_lr()))
        if shift_init:
            with torch.no_grad():
                for n, w in self.weights.items():
                    w.copy_(torch.sign(w) * (w.abs() + self.D[n]))
        if not greedy:
            for n in self.weights:
                self._shadow(n, partial(self._soft_threshold, n))
        self._set_d(self._threshold_at(0))
        if auto_step:
            self._attach_auto_step()

    # -- forward -----------------------------------------------------------------------------
    def _soft_threshold(self, name: str, theta: torch.Tensor) -> torch.Tensor:
        """``S_d(theta)`` with a straight-through backward (the subtracted part is detached)."""
        d = self._d_live[name]
        return theta - theta.detach().clamp(-d, d)

    # -- threshold ---------------------------------------------------------------------------
    def _snapshot_lr(self) -> None:
        self._lr_used = float(self.optimizer.param_groups[self._group]["lr"])

    def _fraction(self, k: int) -> float:
        if self.kind != "exact_lats":
            return self.sched(k)
        return 1.0 if k >= self.total_steps else exact_lats(self.lr_sum, self.lr_total)

    @torch.no_grad()
    def _estimate_D(self) -> None:
        """Extension: D = the magnitude of |theta| at the target sparsity (global or per layer)."""
        scores = {n: w.detach().abs() for n, w in self.weights.items()}
        if self.budget == "global":
            k = round(self.target * sum(s.numel() for s in scores.values()))
            D = sharding.kth_smallest([list(scores.values())], [k])[0] if k > 0 else 0.0
            self.D = {n: D for n in scores}
        else:
            per_layer = allocate(scores, self.target, self.budget)
            ks = {n: round(per_layer[n] * s.numel()) for n, s in scores.items()}
            live = [n for n in scores if ks[n] > 0]
            values = sharding.kth_smallest([[scores[n]] for n in live], [ks[n] for n in live])
            self.D.update(dict.fromkeys(scores, 0.0))
            self.D.update(zip(live, values))

    def _threshold_at(self, k: int) -> dict[str, float]:
        if self.lam is not None:
            return {n: self.lam * self.lr_sum for n in self.d}
        if self.target is not None and k <= self.total_steps and (k % self.control_every == 0 or k == self.total_steps):
            self._estimate_D()
        f = self._fraction(k)
        return {n: max(self.d[n], self.D[n] * f) for n in self.d}

    @torch.no_grad()
    def _set_d(self, new: dict[str, float]) -> None:
        old, self.d = self.d, new
        if self.sync and self.target is not None:  # d estimated from the weights: rank 0 decides
            self.synchronize()
        if self.greedy:  # ablation: shrink the stored weights by the increment
            for n, w in self.weights.items():
                inc = self.d[n] - old[n]
                if inc > 0:
                    w.sub_(w.clamp(-inc, inc))
        self._fill_live()

    @torch.no_grad()
    def _fill_live(self) -> None:
        for n, t in self._d_live.items():
            t.fill_(self.d[n])

    @torch.no_grad()
    def synchronize(self) -> None:
        """Replace every rank's thresholds by rank 0's; a no-op in one process."""
        if world_size() > 1:
            t = broadcast_(torch.tensor([self.d[n] for n in self.d], dtype=torch.float64))
            self.d = dict(zip(self.d, t.tolist()))
            self._fill_live()

    # -- public API --------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: advance the step and the threshold."""
        self._check_live()
        lr = self._lr_used if self._lr_used is not None else float(self.optimizer.param_groups[self._group]["lr"])
        self._lr_used = None
        k = self.step_count
        if self.start <= k < self.total_steps:
            self.lr_sum += lr
        old = sum(self.d.values()) / len(self.d)
        self.step_count = k + 1
        self._set_d(self._threshold_at(k + 1))
        self.last_lambda = (sum(self.d.values()) / len(self.d) - old) / lr if lr > 0 else 0.0

    @property
    def threshold(self) -> float | dict[str, float]:
        """The current threshold: a float when shared by all layers, else ``{layer: d}``."""
        values = set(self.d.values())
        return values.pop() if len(values) == 1 else dict(self.d)

    @torch.no_grad()
    def masks(self) -> MaskSet:
        """Entries currently non-zero in the forward (``|theta| > d``; after ``finalize()``, ``w != 0``)."""
        plain = self.greedy or self.finalized  # the stored weights are already thresholded
        return MaskSet({n: w.abs() > (0.0 if plain else self.d[n]) for n, w in self.weights.items()})

    @torch.no_grad()
    def _finalize(self) -> MaskSet:
        """Write ``weight = S_D(theta)`` (exact projection to the target if ``project``); returns the
        masks (the non-zeros)."""
        if self.project:
            scores = {n: w.abs() for n, w in self.weights.items()}
            keep = magnitude_projection(scores, self.target, self.budget)
            pruned_max = sharding.max_where(scores, {n: ~k for n, k in keep.items()})
            pruned_max = {n: max(v, 0.0) for n, v in pruned_max.items()}  # 0 where nothing is pruned
            if self.budget == "global":
                pruned_max = dict.fromkeys(scores, max(pruned_max.values()))
            for n, w in self.weights.items():
                t = 0.0 if self.greedy else min(self.d[n], pruned_max[n])
                lw = sharding.local(w)
                lw.copy_((lw - lw.clamp(-t, t)) * sharding.local(keep[n]))
        elif not self.greedy:
            for n, w in self.weights.items():
                w.sub_(w.clamp(-self.d[n], self.d[n]))
        return MaskSet({n: w != 0 for n, w in self.weights.items()})

    def state_dict(self) -> dict[str, Any]:
        """Step, thresholds, learning-rate sums and configuration (the latent theta is the model's
        own ``weight``, saved with the model)."""
        return {**self._base_state(), "d": dict(self.d), "D": dict(self.D), "lr_sum": self.lr_sum,
                "lr_total": self.lr_total, "last_lambda": self.last_lambda, "config": self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        if state["config"] != self._config():
            raise ValueError(f"pruner state_dict was made with {state['config']}, this pruner has {self._config()}")
        self.step_count, self.lr_sum, self.lr_total = int(state["step"]), float(state["lr_sum"]), float(state["lr_total"])
        self.d, self.D, self.last_lambda = dict(state["d"]), dict(state["D"]), float(state["last_lambda"])
        self._fill_live()

    def _config(self) -> dict[str, Any]:
        return {"schedule": repr(self.sched), "lam": self.lam, "target": self.target, "budget": self.budget,
                "greedy": self.greedy, "control_every": self.control_every}
