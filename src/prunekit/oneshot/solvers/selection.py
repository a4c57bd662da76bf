"""Support selection by score: magnitude (|W|) and Wanda (|W| * ||X_j||).

Everything works on the 2-D view ``[d_out, d_in]`` of :mod:`prunekit.sparsity.layout`. Magnitude
compares a whole tensor; Wanda compares within each output row, as in the paper. N:M keeps the
N best of every M consecutive input columns for either score.
"""
from __future__ import annotations

import torch

from ...sparsity.patterns import NM, Pattern, nm_mask, unstructured_mask


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs()


def wanda_scores(weight: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_:,j||_2`` with ``sq`` the per-column sum of squared inputs."""
    return weight.detach().abs().to(torch.float64) * sq.to(torch.float64).sqrt().unsqueeze(0)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """Keep-mask of the highest ``scores`` (2-D) at ``sparsity`` under ``pattern``."""
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern)
    return unstructured_mask(scores, sparsity, per_row=per_row)
