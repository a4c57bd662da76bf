"""Wanda: keep the largest ``|W_ij| * ||X_j||`` within each output row.

Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models", sec. 3: comparing per output row is what makes the score work on LLMs. When the row
length does not divide, the layer still prunes exactly ``round(sparsity * d_out * d_in)``. With
``exact`` (the default) an input that is zero on all calibration data is scored with the layer's
mean input norm instead of zero (:mod:`prunekit.oneshot.dead`).
"""
from __future__ import annotations

from ..dead import dead_columns, fill_dead
from ..registry import LayerProblem, Method, Update, register
from ..solvers.selection import select_mask, wanda_scores


@register
class Wanda(Method):
    name = "wanda"
    needs = frozenset({"col_norms"})
    summary = "magnitude x input-column norm, per output row"

    def choose(self, problem: LayerProblem) -> Update:
        w = problem.weight
        sq = problem.stats.sq
        if problem.exact:  # a dead input scores as one of mean energy, not as free to prune
            sq = fill_dead(sq, dead_columns(problem.stats))
        scores = wanda_scores(w, sq)
        mask = select_mask(scores, problem.sparsity, problem.pattern, per_row=True)
        return Update(w * mask, mask)
