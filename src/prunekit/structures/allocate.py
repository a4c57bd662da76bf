"""A global budget: how many units each structure loses when every unit of every layer competes.

1. :func:`unit_scores` scores every unit once, on the dense model: one pass over the calibration
   batches with hooks summing each consumer's input first and second moments, then the chosen
   method's per-unit score, divided by the mean unit score of its own layer.
2. :func:`allocate` ranks the units of all layers together by that normalised score and gives
   each structure a count, lowest scores first, until the target is met, never taking a structure
   below its floor.

Why divide by the layer's mean: a raw score is in the units of that layer's output energy, which
grows with depth along a transformer's residual stream and differs between MLPs and attention, so
ranking raw scores would strip the early layers to their floors whatever their units do. The
normalised score asks "how much less than its layer's typical unit does this unit matter": it is
unchanged when a layer's weights or inputs are rescaled, so what competes is the shape of each
layer's score distribution (a layer with a long tail of weak units gives up more).

``method="obs"`` is ranked here by its diagonal approximation, the Wanda score ``||W[:, j]||^2
E[x_j^2]`` (the OBS cost ``||W[:, j]||^2 / Hinv_jj`` when ``H`` is diagonal): one pass holding only
second moments, not one ``d_in x d_in`` matrix per layer. The block-by-block pipeline then chooses
the units with the full method on the pruned model's statistics; only the counts come from here.

A structure gives units up in *steps* that keep it valid: one unit at a time; with
``multiple_of`` the kept MLP width stays a multiple of it; with grouped-query attention a step
takes one query head from every key/value group (the ``k``-th weakest of each group). A step's
score is the mean of its units' normalised scores, and the steps of one structure are taken in
order (their scores never decrease). Ties break towards the earlier structure, then the earlier
step, so the allocation is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calls import eval_mode
from ..oneshot.runtime.ranks import Ranks
from ..oneshot.solvers.columns import group_scores
from .surgery import matrix
from .units import Structure


@dataclass(frozen=True)
class Step:
    """``units`` more units of structure number ``site`` removed, at mean normalised ``score``."""

    score: float
    site: int
    index: int
    units: int


@torch.no_grad()
def unit_scores(model: nn.Module, found: list[Structure], calls: list[tuple[tuple, dict]],
                method: str) -> dict[str, torch.Tensor]:
    """``{owner: [units] scores / their mean}`` on the dense model (``calls`` unused for
    ``magnitude``); ``obs`` is scored by Wanda's score (see the module's docstring)."""
    score = "wanda" if method == "obs" else method
    modules = dict(model.named_modules())
    moments: dict[str, list[Any]] = {}
    if score != "magnitude":
        if not calls:
            raise ValueError(f"budget='global' with method={method!r} scores units on calibration data; "
                             "pass calibration batches (or method='magnitude')")
        handles = []
        for s in found:
            moments[s.owner] = [0, 0.0, 0.0]

            def hook(_module, args, key=s.owner):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                m = moments[key]
                m[0], m[1], m[2] = m[0] + x.shape[0], m[1] + x.sum(0), m[2] + x.pow(2).sum(0)

            handles.append(modules[s.consumer].register_forward_pre_hook(hook))
        try:
            with eval_mode(model):
                for args, kwargs in calls:
                    model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        _sum_over_ranks(moments)
    out = {}
    for s in found:
        kw = {}
        if s.owner in moments:
            n, total, squares = moments[s.owner]
            if not n:
                raise ValueError(f"{s.consumer} was not called by the model's forward; its units cannot be scored")
            mean = total / n
            kw = {"sq_mean": squares / n, "variance": (squares / n - mean ** 2).clamp_min(0)}
        values = group_scores(score, matrix(modules[s.consumer]).double(), s.column_groups(), **kw)
        out[s.owner] = values / values.mean().clamp_min(1e-300)
    return out


def _sum_over_ranks(moments: dict[str, list[Any]]) -> None:
    """Every rank's batches in each ``[count, sum, sum of squares]`` (nothing in one process)."""
    ranks = Ranks.current()
    if not ranks.active:
        return
    for m in moments.values():
        if not isinstance(m[1], torch.Tensor):  # this rank's share never reached the consumer
            raise ValueError("a consumer saw no calibration rows on this rank; give every rank batches")
        count = torch.tensor([float(m[0])], dtype=torch.float64, device=m[1].device)
        ranks.sum(count, m[1], m[2])
        m[0] = int(count.item())


def _order(values: torch.Tensor) -> list[int]:
    """Indices by ascending value, ties towards the lower index."""
    return sorted(range(len(values)), key=lambda i: (float(values[i]), i))


def steps(site: int, s: Structure, scores: torch.Tensor, floor: float, multiple_of: int = 1) -> list[Step]:
    """The steps in which structure ``s`` (number ``site``) may give up units without going below
    ``floor`` of its units (at least one unit, one query head per key/value group, stays)."""
    if s.kind == "heads" and s.q_per_kv > 1:
        keep = max(1, math.ceil(floor * s.q_per_kv - 1e-9))
        per_group = [[g * s.q_per_kv + i for i in _order(scores[g * s.q_per_kv:(g + 1) * s.q_per_kv])]
                     for g in range(s.kv_heads)]
        return [Step(float(scores[[grp[k] for grp in per_group]].mean()), site, k, s.kv_heads)
                for k in range(s.q_per_kv - keep)]
    keep = max(1, math.ceil(floor * s.units - 1e-9))
    widths = list(range(s.units - 1, keep - 1, -1))
    if s.kind in ("mlp", "channels") and multiple_of > 1:
        widths = [w for w in widths if w % multiple_of == 0]
    ranked = scores[_order(scores)]
    out, kept = [], s.units
    for i, w in enumerate(widths):
        out.append(Step(float(ranked[s.units - kept:s.units - w].mean()), site, i, kept - w))
        kept = w
    return out


def allocate(found: list[Structure], scores: dict[str, torch.Tensor], unit_cost: dict[str, float], goal: float,
             floor: float, multiple_of: int = 1) -> dict[str, int]:
    """``{owner: units to remove}``: the prefix of all structures' steps, ranked by score, whose
    cost (``unit_cost`` per unit) is closest to ``goal``. Raises ValueError when the floors leave
    the goal out of reach (by more than half the cheapest step)."""
    ranked = sorted((st for i, s in enumerate(found) for st in steps(i, s, scores[s.owner], floor, multiple_of)),
                    key=lambda st: (st.score, st.site, st.index))
    cost = [st.units * unit_cost[found[st.site].owner] for st in ranked]
    reachable = sum(cost)
    cheapest = min(cost, default=0.0)
    if goal > reachable + cheapest / 2 + 1e-9 * goal:
        raise ValueError(f"budget='global': floor={floor:g} keeps too much to remove the target; the floors allow at "
                         f"most {reachable / goal:.0%} of it; lower floor= or the target")
    best, best_gap, spent = 0, abs(goal), 0.0
    for k, c in enumerate(cost, start=1):
        spent += c
        if abs(spent - goal) < best_gap - 1e-9 * max(goal, 1.0):
            best, best_gap = k, abs(spent - goal)
    counts = {s.owner: 0 for s in found}
    for st in ranked[:best]:
        counts[found[st.site].owner] += st.units
    return counts
