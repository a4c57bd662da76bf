"""SNOWS: refit the kept weights against the next K measured operations (Newton-CG).

Lucas & Mazumder 2025, "Preserving Deep Representations in One-Shot Pruning: A Hessian-Free
Second-Order Optimization Framework", arXiv 2411.18376. The lookahead loss and the solver are in
:mod:`prunekit.oneshot.lookahead` and :mod:`prunekit.oneshot.solvers.newton_cg`; the options in
:mod:`prunekit.oneshot.snows_options` (shared with structured pruning).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers.base import kind_of
from ..solvers.lstsq_cg import lstsq_warm_start
from ..registry import LayerProblem, Refine, Update, register
from ..lookahead import measured_rule, snows_refit
from ..snows_options import (AUTO_FRACTION, LARGE_INPUT, WARM_STARTS, SnowsOptions,  # noqa: F401 - re-exported
                             auto_hessian_fraction)


def _joint_units(layer: nn.Module, param: nn.Parameter | None) -> int:
    """How many units of ``layer`` one solve can refit together (1: only its own): the groups of
    a grouped convolution live in one parameter and are calibrated in one stage, so none of them
    changes another's statistics and their lookahead loss is one function of the whole weight."""
    kind = kind_of(layer)
    units = kind.units(layer)
    if len(units) < 2 or len(kind.stages(layer)) != 1 or param is None:
        return 1
    return len(units) if all(kind.parameter(layer, u) is param for u in units) else 1


@register
class Snows(Refine):
    name = "snows"
    needs = frozenset({"hessian", "dense_target", "sequential"})
    Options = SnowsOptions
    summary = "Newton-CG on a K-operation lookahead loss"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        # keep-masks of the groups of a grouped convolution waiting for their joint solve
        self._pending: dict[int, list[torch.Tensor]] = {}

    def refine(self, problem: LayerProblem, chosen: Update) -> Update:
        opts, ctx, s = self.options, problem.context, problem.stats
        w, mask = chosen.weight, chosen.mask
        if opts.warm_start == "lstsq" or (opts.warm_start == "auto" and not problem.method.updates_weights):
            # exact per-row least squares on small layers, batched CG on large ones (lstsq_cg.py)
            w = lstsq_warm_start(problem.weight, mask, s.hessian, s.cross, damp=opts.warm_start_damp,
                                 dtype=problem.weight.dtype)
        ctx.write(w, mask)
        weight_mask, frozen, note = ctx.weight_mask(mask), ctx.frozen, ""
        n = 1 if opts.per_group else _joint_units(ctx.layer, ctx.parameter)
        if n > 1:  # one solve for all groups, run when the last one arrives (a depthwise conv: 1 not C)
            pending = self._pending.setdefault(id(ctx.layer), [])
            pending.append(weight_mask)
            if len(pending) < n:
                return Update(ctx.read(), mask, "refit jointly with the layer's other groups")
            weight_mask, frozen = torch.stack(self._pending.pop(id(ctx.layer))).any(0), None
            note = f"one refit for all {n} groups (lookahead losses of the whole layer)"
        solve, before, after = snows_refit(
            ctx.model, ctx.chain, ctx.layer, weight_mask, ctx.inputs, k=opts.k,
            solver=opts.solver(ctx.inputs, ctx.model_input),
            targets=ctx.targets, block_layers=ctx.block_layers, dense_weights=ctx.dense_weights,
            measured_by=measured_rule(opts.measured), progress=ctx.progress, param=ctx.parameter, frozen=frozen,
            ranks=ctx.ranks, hvp=opts.hvp,
        )
        notes = [note] if note else []
        if solve.failed_line_searches:
            notes.append(f"{solve.failed_line_searches} line searches failed")
        if solve.negative_curvature:  # CG stopped at a direction of non-positive curvature
            notes.append(f"negative curvature in {solve.negative_curvature} of {solve.steps} CG solves")
        return Update(ctx.read(), mask, "; ".join(notes), (before, after))
