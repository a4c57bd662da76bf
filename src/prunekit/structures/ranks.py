"""Structured pruning over several processes: what every rank must agree on first.

Under ``torchrun`` every rank runs :func:`prunekit.prune_structured` on the same model with
its own calibration batches; the consumers' statistics (:meth:`.stats.ConsumerStats.reduce`),
the global budget's scores and SNOWS's steps are summed over the ranks, so all of them remove
the same units. That holds only if they start from the same model and options: checked here,
before anything changes, with :meth:`~prunekit.oneshot.runtime.ranks.Ranks.same` (every rank
raises the same error naming the first difference).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..oneshot.runtime.ranks import SAME_HINT, Ranks, checksum, describe_value


def agree(ranks: Ranks, model: nn.Module, config) -> None:
    """Raise on every rank unless all ranks hold the same options and the same parameters."""
    if not ranks.active:
        return
    fingerprint = {f.name: describe_value(getattr(config, f.name)) for f in dataclasses.fields(config)
                   if f.name != "progress"}
    fingerprint["parameters"] = {n: f"shape {tuple(p.shape)}, {p.dtype}, checksum {checksum(p)}"
                                 for n, p in model.named_parameters()}
    ranks.same("prune_structured's options and model", fingerprint,
               hint=SAME_HINT.replace("prune()", "prune_structured()"))
