"""SparseGPT: choose the support block by block and update the kept weights (OBS steps).

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", sec. 3 (Algorithm 1); the solver is :func:`prunekit.oneshot.solvers.sparsegpt.sparsegpt`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...sparsity.patterns import NM, Pattern
from ..options import check_int, check_number
from ..registry import LayerProblem, Method, Update, register
from ..solvers.sparsegpt import sparsegpt


@dataclass(frozen=True)
class SparseGPTOptions:
    """``block_size``: columns chosen together (the paper's lazy-batch width: 128; None means 128
    rounded down to a multiple of M under N:M, whose groups must not straddle blocks);
    ``damp``: Hessian dampening, a fraction of its mean diagonal (paper: 1%)."""

    block_size: int | None = None
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.block_size is not None:
            check_int(self.block_size, "block_size", 1)
        check_number(self.damp, "damp", 0.0)

    def width(self, pattern: Pattern) -> int:
        """The block width for ``pattern`` (ValueError if a given width cannot hold whole groups)."""
        m = pattern.m if isinstance(pattern, NM) else 1
        if self.block_size is None:
            return max(m, 128 - 128 % m)
        if self.block_size % m:
            raise ValueError(f"block_size={self.block_size} is not a multiple of M={m} for pattern {pattern}; "
                             f"use {max(m, self.block_size - self.block_size % m)} or leave it unset")
        return self.block_size


@register
class SparseGPT(Method):
    name = "sparsegpt"
    needs = frozenset({"hessian"})
    Options = SparseGPTOptions
    updates_weights = True
    summary = "OBS weight updates from the input Hessian"

    def check(self, pattern: Pattern) -> None:
        self.options.width(pattern)

    def choose(self, problem: LayerProblem) -> Update:
        opts = self.options
        out = sparsegpt(problem.weight, problem.stats.hessian, problem.sparsity, problem.pattern,
                        block_size=opts.width(problem.pattern), damp=opts.damp, dtype=problem.weight.dtype,
                        dead_inputs="keep" if problem.exact else "zero")
        note = f"dampening raised to {out.damp_used:g}" if out.damp_used != opts.damp else ""
        return Update(out.weight, out.mask, note)
