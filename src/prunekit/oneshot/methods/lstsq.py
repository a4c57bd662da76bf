"""Least squares: the exact per-row refit of the kept weights on a fixed support.

Minimises the layer-wise ``mean((X_s W'^T - X_t W0^T)^2)`` against the dense block's inputs
``X_t`` (the layer-wise objective of Frantar & Alistarh 2023, sec. 2, solved exactly per row);
the solver is :func:`prunekit.oneshot.solvers.lstsq.lstsq_refit`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..solvers.lstsq import lstsq_refit
from ..options import check_number
from ..registry import LayerProblem, Refine, Update, register


@dataclass(frozen=True)
class LstsqOptions:
    """``damp``: ridge term, a fraction of the Hessian's mean diagonal."""

    damp: float = 1e-4

    def __post_init__(self) -> None:
        check_number(self.damp, "damp", 0.0)


@register
class Lstsq(Refine):
    name = "lstsq"
    needs = frozenset({"hessian", "dense_target"})
    Options = LstsqOptions
    summary = "exact per-row least squares on the support"

    def refine(self, problem: LayerProblem, chosen: Update) -> Update:
        s = problem.stats
        return Update(lstsq_refit(problem.weight, chosen.mask, s.hessian, s.cross, damp=self.options.damp,
                                  dtype=problem.weight.dtype))
