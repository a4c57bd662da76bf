"""How many units each structure loses: a uniform ratio, or a ratio found for a parameter target.

One ratio for every layer keeps a standard config (one ``intermediate_size``, one head count).
With grouped-query attention the query heads removed per key/value group must be equal, so a
head count is rounded per group.
"""
from __future__ import annotations

from torch import nn

from .find import out_features, producer_weight
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


def unit_params(model: nn.Module, s: Structure) -> int:
    """Parameters one unit of ``s`` holds (its producer rows, consumer columns and biases)."""
    modules = dict(model.named_modules())
    total = 0
    producers = s.producers + (s.kv_producers if s.kind == "heads" and s.q_per_kv == 1 else ())
    for name in producers:
        weight, bias = producer_weight(modules[name])
        total += s.unit_size * s.fused * (weight.shape[1] + (1 if bias is not None else 0))
    consumer = modules[s.consumer]
    total += s.unit_size * out_features(consumer)
    return total


def counts_for(model: nn.Module, found: list[Structure], ratio: float | None, params: float | None,
               multiple_of: int = 1) -> dict[str, int]:
    """``{owner: units to remove}`` for a ``ratio`` of units or a ``params`` fraction of the
    parameters of the layers the structures live in (the closest uniform ratio)."""
    if ratio is not None:
        for s in found:
            per_group = ratio * s.q_per_kv
            if s.kind == "heads" and s.q_per_kv > 1 and abs(per_group - round(per_group)) > 1e-9:
                possible = ", ".join(f"{k}/{s.q_per_kv}" for k in range(1, s.q_per_kv))
                raise ValueError(f"{s.owner}: grouped-query attention with {s.q_per_kv} query heads per key/value "
                                 f"head can lose {possible} of its heads (the same in every group), not "
                                 f"ratio={ratio:g}; pick one of those or use params=")
        return {s.owner: count_at(s, ratio, multiple_of) for s in found}
    per_unit = {s.owner: unit_params(model, s) for s in found}
    goal = params * layer_params(model, found)
    best, best_gap = 0.0, float("inf")
    for step in range(1, 1000):
        r = step / 1000
        if any(count_at(s, r, multiple_of) >= s.units for s in found):
            break
        gap = abs(sum(count_at(s, r, multiple_of) * per_unit[s.owner] for s in found) - goal)
        if gap < best_gap - 1e-9:
            best, best_gap = r, gap
    return {s.owner: count_at(s, best, multiple_of) for s in found}


def layer_params(model: nn.Module, found: list[Structure]) -> int:
    """Parameters of the layers holding the structures: the owners' common parents (for a
    transformer, every decoder/encoder layer), without embeddings or heads outside them."""
    owners = [s.owner for s in found]
    parents = {o.rsplit(".", 1)[0] if "." in o else "" for o in owners}
    modules = dict(model.named_modules())
    seen: set[int] = set()
    total = 0
    for p in parents:
        for t in modules[p].parameters():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total
