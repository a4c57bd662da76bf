"""Magnitude: keep the largest ``|W|`` of the whole layer (no data needed).

The classic baseline (Han et al. 2015); with N:M, the largest N of every M input columns.
"""
from __future__ import annotations

from ..registry import LayerProblem, Method, Update, register
from ..solvers.selection import magnitude_scores, select_mask


@register
class Magnitude(Method):
    name = "magnitude"
    summary = "largest magnitudes of the layer; no data"

    def choose(self, problem: LayerProblem) -> Update:
        w = problem.weight
        mask = select_mask(magnitude_scores(w), problem.sparsity, problem.pattern, per_row=False)
        return Update(w * mask, mask)
