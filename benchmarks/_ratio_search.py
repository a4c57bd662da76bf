"""Find the pruning ratio whose removed fraction is closest to a target (benchmark helper, no torch).

A pruner driven by a per-layer channel ratio (torch-pruning's ``pruning_ratio``) removes a
fraction of the multiply-adds that grows with the ratio in steps (channel counts are integers).
The peer benchmarks must match prunekit's FLOPs target as closely as that staircase allows, so
they search the ratio instead of guessing it: a coarse scan for the first ratio at or above the
target (torch-pruning's count is not monotone at high ratios: it may leave a group whole that it
cannot shrink to a multiple of the heads), bisection between it and the scan point before, then
the closer of the two ends.
"""
from __future__ import annotations

from typing import Callable


def closest_ratio(removed: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 0.95,
                  tol: float = 1e-3, step: float = 0.05) -> tuple[float, float]:
    """``(ratio, removed(ratio))`` with ``removed(ratio)`` closest to ``target`` around the first
    crossing of ``target`` on a scan of ``[lo, hi]`` by ``step`` (exact for a non-decreasing
    ``removed``), to within the ratio resolution ``tol``; with no crossing, the scanned ratio
    that comes closest.

    ``removed`` maps a ratio to the fraction of FLOPs it removes (it may raise ``ValueError``
    for ratios a pruner refuses; those count as too high). Ties go to the smaller ratio.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be a fraction in (0, 1), got {target!r}")
    if not 0.0 <= lo < hi < 1.0:
        raise ValueError(f"need 0 <= lo < hi < 1, got lo={lo!r}, hi={hi!r}")
    if tol <= 0 or step <= 0:
        raise ValueError(f"tol and step must be positive, got tol={tol!r}, step={step!r}")
    cache: dict[float, float] = {}

    def f(r: float) -> float:
        if r not in cache:
            try:
                cache[r] = removed(r)
            except ValueError:
                cache[r] = float("inf")
        return cache[r]

    grid = [lo + i * step for i in range(int((hi - lo) / step) + 1)] + [hi]
    if f(lo) >= target:
        return lo, f(lo)
    first = next((i for i, r in enumerate(grid) if f(r) >= target), None)
    if first is None:
        return min(((r, f(r)) for r in grid), key=lambda rv: (abs(rv[1] - target), rv[0]))
    below, above = grid[first - 1], grid[first]  # invariant: f(below) < target <= f(above)
    while above - below > tol:
        mid = (below + above) / 2
        if f(mid) >= target:
            above = mid
        else:
            below = mid
    candidates = [(r, f(r)) for r in (below, above) if f(r) != float("inf")]
    return min(candidates, key=lambda rv: (abs(rv[1] - target), rv[0]))
