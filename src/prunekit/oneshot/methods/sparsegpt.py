"""SparseGPT: choose the support block by block and update the kept weights (OBS steps).

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", sec. 3 (Algorithm 1); the solver is :func:`prunekit.oneshot.sparsegpt.sparsegpt`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..options import check_int, check_number
from ..registry import LayerProblem, Selector, Update, register
from ..sparsegpt import sparsegpt


@dataclass(frozen=True)
class SparseGPTOptions:
    """``block_size``: columns chosen together (the paper's lazy-batch width, 128);
    ``damp``: Hessian dampening, a fraction of its mean diagonal (paper: 1%)."""

    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        check_int(self.block_size, "block_size", 1)
        check_number(self.damp, "damp", 0.0)


@register
class SparseGPT(Selector):
    name = "sparsegpt"
    needs = frozenset({"hessian"})
    Options = SparseGPTOptions
    updates_weights = True
    summary = "OBS weight updates from the input Hessian"

    def select(self, problem: LayerProblem) -> Update:
        opts = self.options
        out = sparsegpt(problem.weight, problem.stats.hessian, problem.sparsity, problem.pattern,
                        block_size=opts.block_size, damp=opts.damp, dtype=problem.weight.dtype,
                        dead_inputs="keep" if problem.exact else "zero")
        note = f"dampening raised to {out.damp_used:g}" if out.damp_used != opts.damp else ""
        return Update(out.weight, out.mask, note)
