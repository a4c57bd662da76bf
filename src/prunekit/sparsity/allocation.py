"""Per-layer budgets: how much of each prunable tensor to prune.

Every budget returns a per-layer sparsity ``{name: s_l}`` such that ``round(s_l * n_l)`` is the
exact number of entries that layer loses:

* ``uniform`` -- every layer at the target;
* ``global`` -- one threshold over the scores of all layers (magnitude by default), with an
  optional per-layer cap (SNOWS convention); never sorts the whole model at once; scores sharded
  by FSDP2 (DTensors) are counted over all shards (:mod:`prunekit.sparsity.sharding`);
* ``erk`` -- Erdos-Renyi-Kernel densities, proportional to ``sum(shape) / prod(shape)``;
* ``overrides`` -- ``{regex: sparsity}`` fixing some layers; under ``global``/``erk`` the other
  layers share what is left of the overall target.
"""
from __future__ import annotations

import re
import warnings
from typing import Mapping

import torch

from . import sharding

BUDGETS = ("uniform", "global", "erk")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}; e.g. {name}=0.5 prunes half the weights")
    return float(sparsity)


def allocate(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    budget: str = "uniform",
    *,
    cap: float | None = None,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer sparsities for ``scores`` (one tensor per layer; only its shape matters
    except under ``global``, where higher scores survive)."""
    sparsity = check_sparsity(sparsity)
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if cap is not None:
        cap = check_sparsity(cap, "cap")
    fixed = _apply_overrides(list(scores), overrides or {})
    free = [n for n in scores if n not in fixed]
    out = dict(fixed)
    if budget == "uniform":
        out.update({n: sparsity for n in free})
        return {n: out[n] for n in scores}
    total = sum(scores[n].numel() for n in scores)
    fixed_pruned = sum(round(fixed[n] * scores[n].numel()) for n in fixed)
    free_total = sum(scores[n].numel() for n in free)
    to_prune = round(sparsity * total) - fixed_pruned
    if free and not 0 <= to_prune <= free_total:
        raise ValueError(
            f"overrides {dict(overrides or {})} leave {to_prune} of {free_total} free weights to prune "
            f"for sparsity={sparsity}; loosen the overrides or change sparsity"
        )
    if budget == "global":
        out.update(global_counts({n: scores[n] for n in free}, to_prune, cap))
    else:
        out.update(erk({n: tuple(scores[n].shape) for n in free}, to_prune / max(free_total, 1)))
    return {n: out[n] for n in scores}


def _apply_overrides(names: list[str], overrides: Mapping[str, float]) -> dict[str, float]:
    fixed: dict[str, float] = {}
    for pattern, value in overrides.items():
        value = check_sparsity(value, f"overrides[{pattern!r}]")
        try:
            hits = [n for n in names if re.search(pattern, n)]
        except (re.error, TypeError) as exc:
            raise ValueError(f"overrides key {pattern!r} is not a regular expression ({exc}); e.g. {{'fc1': 0.3}}") from exc
        if not hits:
            raise ValueError(f"overrides key {pattern!r} matches no prunable layer; known layers: {names[:8]}...")
        for n in hits:
            fixed[n] = value
    return fixed


def global_counts(scores: Mapping[str, torch.Tensor], to_prune: int, cap: float | None = None) -> dict[str, float]:
    """Prune the ``to_prune`` lowest scores across layers, each layer losing at most
    ``round(cap * n_l)``; returns per-layer sparsities. Exact, ties filled in layer order."""
    names = list(scores)
    numel = {n: scores[n].numel() for n in names}
    caps = {n: numel[n] if cap is None else round(cap * numel[n]) for n in names}
    if to_prune <= 0:
        return {n: 0.0 for n in names}
    if sum(caps.values()) <= to_prune:
        if cap is not None and sum(caps.values()) < to_prune:
            warnings.warn(f"per-layer cap {cap} makes the target unreachable; every layer is pruned to its cap")
        return {n: caps[n] / numel[n] for n in names}
    if any(sharding.is_sharded(s) for s in scores.values()):  # FSDP2: counts over all shards
        counts = sharding.global_counts(scores, to_prune, caps)
        return {n: counts[n] / numel[n] for n in names}
    # layers of one size sorted as the rows of one matrix: one batched search per size and round
    # (a depthwise convolution is hundreds of same-size units)
    by_size: dict[int, list[str]] = {}
    for n in names:
        by_size.setdefault(numel[n], []).append(n)
    buckets = {size: torch.sort(torch.stack([scores[n].detach().reshape(-1).double() for n in ns]), dim=1).values
               for size, ns in by_size.items()}
    bucket_caps = {size: torch.tensor([caps[n] for n in ns]) for size, ns in by_size.items()}
    flat = {n: buckets[size][i] for size, ns in by_size.items() for i, n in enumerate(ns)}

    def counts(tau: float, right: bool) -> dict[int, torch.Tensor]:
        """Per size, each layer's count of scores <= tau (< tau unless ``right``), capped."""
        out = {}
        for size, mat in buckets.items():
            t = torch.full((mat.shape[0], 1), tau, dtype=torch.float64)
            out[size] = torch.minimum(torch.searchsorted(mat, t, right=right).squeeze(1), bucket_caps[size])
        return out

    def count(tau: float, right: bool) -> dict[str, int]:
        got = counts(tau, right)
        return {n: int(got[size][i]) for size, ns in by_size.items() for i, n in enumerate(ns)}

    lo = min(float(v[0]) for v in flat.values()) - 1.0
    hi = max(float(v[-1]) for v in flat.values())
    for _ in range(200):  # invariant: count(lo) < to_prune <= count(hi)
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(int(c.sum()) for c in counts(mid, True).values()) >= to_prune:
            hi = mid
        else:
            lo = mid
    # The smallest actual score above lo is the exact k-th value.
    t = torch.tensor([lo], dtype=torch.float64)
    tau = min(float(flat[n][i]) for n in names if (i := int(torch.searchsorted(flat[n], t, right=True))) < flat[n].numel())
    pruned = count(tau, right=False)
    upto = count(tau, right=True)
    left = to_prune - sum(pruned.values())
    for n in names:  # ties at tau, filled in layer order
        extra = min(left, upto[n] - pruned[n])
        pruned[n] += extra
        left -= extra
    return {n: pruned[n] / flat[n].numel() for n in names}


def erk(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel sparsities with mean ``sparsity`` (Evci et al. 2020); layers whose
    density would exceed 1 are kept dense and the rest rescaled."""
    numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rhs = sum((1 - sparsity) * numel[n] if n not in dense else -sparsity * numel[n] for n in shapes)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = rhs / divisor if divisor else 0.0
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1]
        if not over:
            break
        dense.update(over)
    return {n: 0.0 if n in dense else min(max(1 - eps * raw[n], 0.0), 1.0) for n in shapes}
