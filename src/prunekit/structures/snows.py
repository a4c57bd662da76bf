"""``refine="snows"`` for structures: refit what survives against SNOWS's K-step lookahead loss.

The design: the lookahead runs *before* the surgery, while every module still has its dense
shape, and the surgery follows. The consumer is given its warm start (the least-squares refit of
the kept columns) with the removed columns held at exactly zero by the support mask, so S (the
current model) computes what the smaller model will compute: a removed neuron's activation is
multiplied by a zero column, and a head's output by zero columns of ``o_proj``. D, the dense
reference, is then the very same modules with their dense weights swapped back in
(:func:`prunekit.oneshot.blocks.swapped_weights`, as mask pruning does), so S and D are fed the
same block input and measure the same tensors; no second copy of the block is needed. After the
Newton-CG solve (:func:`prunekit.oneshot.lookahead.snows_refit`, support fixed: the kept
columns) the kept columns are read back and :func:`~.surgery.shrink` removes the rest.

Only the consumer is refit: the producers keep their dense rows (refitting them as well, with
their removed rows frozen, is possible in the same frame but was not measured). Earlier
structures of the same block are already smaller in both S and D: D gives back the dense weight
of this structure's consumer only, which matches the least-squares target (the dense layer on
the pruned model's inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..layers.base import kind_of
from ..oneshot.lookahead import measured_rule, snows_refit
from ..oneshot.runtime.ranks import Ranks
from ..oneshot.snows_options import SnowsOptions
from .surgery import Undo
from .units import Structure


def prunable_ids(model: nn.Module) -> set[int]:
    """Ids of the modules a layer kind reads as matrices: what the lookahead measures by
    default (with activations and attention modules)."""
    out = set()
    for module in model.modules():
        try:
            kind_of(module)
        except TypeError:  # no layer kind: not a matrix
            continue
        out.add(id(module))
    return out


def snows_structure(
    model: nn.Module,
    s: Structure,
    cols: torch.Tensor,
    warm: torch.Tensor,
    warm_bias: torch.Tensor | None,
    chain: Sequence[tuple[str, nn.Module]],
    inputs: list[tuple[tuple, dict]],
    options: SnowsOptions,
    targets: set[int],
    undo: Undo,
) -> tuple[torch.Tensor, tuple[float, float]]:
    """Refit ``s``'s consumer (kept columns ``cols`` of its layer kind's matrix, in any order; warm
    start ``warm`` ``[d_out, len(cols)]``, bias ``warm_bias`` if one was fitted) against the lookahead loss on the block ``inputs``,
    through ``chain`` (this block and the later ones). Returns the refit kept columns (float64)
    and the lookahead loss on the held-out batch (warm start, after)."""
    modules = dict(model.named_modules())
    consumer = modules[s.consumer]
    kind = kind_of(consumer)
    full = torch.zeros(kind.matrix(consumer).shape, dtype=torch.float64, device=warm.device)
    full[:, cols] = warm.double()
    dense = {s.consumer: {"weight": consumer.weight.detach()}}  # the old Parameter: kept by undo, never written
    if warm_bias is not None:  # D is the dense layer: its own bias (zero where it had none), not the fitted one
        dense[s.consumer]["bias"] = consumer.bias.detach() if consumer.bias is not None else \
            torch.zeros(warm_bias.shape, dtype=consumer.weight.dtype, device=consumer.weight.device)
    undo.set(consumer, "weight", nn.Parameter(consumer.weight.detach().clone(), requires_grad=True))
    kind.write(consumer, full)
    if warm_bias is not None:
        like = consumer.bias if consumer.bias is not None else consumer.weight
        undo.set(consumer, "bias", nn.Parameter(warm_bias.to(dtype=like.dtype, device=like.device).clone()))
    support = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
    support[:, cols] = True
    with torch.enable_grad():
        _, before, after = snows_refit(
            model, chain, consumer, kind.weight_mask(consumer, support), inputs, k=options.k,
            solver=options.solver(inputs, None), targets=targets, block_layers={s.consumer: consumer},
            dense_weights=dense, measured_by=measured_rule(options.measured), param=consumer.weight, hvp=options.hvp,
            ranks=Ranks.current())
    return kind.matrix(consumer).double()[:, cols], (before, after)

