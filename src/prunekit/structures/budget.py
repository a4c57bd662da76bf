"""How many units each structure loses: a uniform ratio (or the uniform ratio closest to a
parameter or FLOPs target), or a global budget with per-layer floors (:mod:`.allocate`).

One ratio for every layer keeps a standard config (one ``intermediate_size``, one head count).
With grouped-query attention the query heads removed per key/value group must be equal, so a
head count is rounded per group. The target is exactly one of ``ratio`` (of each structure's units;
under a global budget, of all units of a kind), ``params`` (of the parameters of the layers holding
the structures) and ``flops`` (of their FLOPs per token, :mod:`.costs`).
"""
from __future__ import annotations

from torch import nn

from .allocate import allocate, unit_scores
from .costs import attention_length, layer_params, unit_costs, unit_params  # noqa: F401 (re-exported)
from .find import out_features
from .units import Structure


def count_at(s: Structure, ratio: float, multiple_of: int = 1) -> int:
    """Units of ``s`` removed at ``ratio`` (rounded; per key/value group for grouped heads). For
    MLP neurons, ``multiple_of`` rounds the kept width to a multiple of it (matrix kernels run
    fastest on widths like 64), never keeping fewer than ``multiple_of``."""
    if s.kind == "heads" and s.q_per_kv > 1:
        return round(ratio * s.q_per_kv) * s.kv_heads
    count = round(ratio * s.units)
    if s.kind == "mlp" and multiple_of > 1 and count:
        kept = max(multiple_of, round((s.units - count) / multiple_of) * multiple_of)
        count = max(s.units - kept, 0)
    return count


BUDGETS = ("uniform", "global")
GLOBAL_FLOOR = 0.25  # the default share of each structure's units a global budget keeps


def counts_for(model: nn.Module, found: list[Structure], ratio: float | None, params: float | None,
               multiple_of: int = 1, *, flops: float | None = None, budget: str = "uniform",
               floor: float | None = None, method: str = "wanda",
               calls: list[tuple[tuple, dict]] | None = None) -> dict[str, int]:
    """``{owner: units to remove}`` for exactly one target: a ``ratio`` of units, a ``params``
    fraction of the parameters or a ``flops`` fraction of the FLOPs per token of the layers the
    structures live in. ``budget="uniform"``: the same ratio everywhere (for ``params``/``flops``
    the closest one); ``"global"``: units ranked across layers (:mod:`.allocate`), each structure
    keeping at least ``floor`` of its units (default 0.25). ``calls``: calibration batches, for
    the global scores and the attention length of ``flops``."""
    calls = calls or []
    seq_len = attention_length(model, found, calls) if flops is not None else 0
    if budget == "global":
        return _global(model, found, ratio, params, flops, multiple_of, GLOBAL_FLOOR if floor is None else floor,
                       method, calls, seq_len)
    if ratio is not None:
        for s in found:
            per_group = ratio * s.q_per_kv
            if s.kind == "heads" and s.q_per_kv > 1 and abs(per_group - round(per_group)) > 1e-9:
                possible = ", ".join(f"{k}/{s.q_per_kv}" for k in range(1, s.q_per_kv))
                raise ValueError(f"{s.owner}: grouped-query attention with {s.q_per_kv} query heads per key/value "
                                 f"head can lose {possible} of its heads (the same in every group), not "
                                 f"ratio={ratio:g}; pick one of those or use params=")
        return {s.owner: count_at(s, ratio, multiple_of) for s in found}
    per_unit, total = unit_costs(model, found, "params" if params is not None else "flops", seq_len)
    goal = (params if params is not None else flops) * total
    best, best_gap = 0.0, float("inf")
    for step in range(1, 1000):
        r = step / 1000
        if any(count_at(s, r, multiple_of) >= s.units for s in found):
            break
        gap = abs(sum(count_at(s, r, multiple_of) * per_unit[s.owner] for s in found) - goal)
        if gap < best_gap - 1e-9:
            best, best_gap = r, gap
    return {s.owner: count_at(s, best, multiple_of) for s in found}


def _global(model, found, ratio, params, flops, multiple_of, floor, method, calls, seq_len) -> dict[str, int]:
    scores = unit_scores(model, found, calls, method)
    if ratio is None:
        per_unit, total = unit_costs(model, found, "params" if params is not None else "flops", seq_len)
        goal = (params if params is not None else flops) * total
        return allocate(found, scores, per_unit, goal, floor, multiple_of)
    counts: dict[str, int] = {}
    for kind in dict.fromkeys(s.kind for s in found):  # a ratio of units: neurons and heads apart
        mine = [s for s in found if s.kind == kind]
        counts.update(allocate(mine, scores, {s.owner: 1 for s in mine}, ratio * sum(s.units for s in mine), floor,
                               multiple_of))
    return {s.owner: counts[s.owner] for s in found}
