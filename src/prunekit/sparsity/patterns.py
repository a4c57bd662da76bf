"""Sparsity patterns: scores -> boolean keep-mask with exact counts.

``Unstructured()`` keeps the highest-scoring entries of a comparison group (a whole tensor, or
each output row); ``NM(n, m)`` keeps the ``n`` highest of every ``m`` consecutive weights along
the input axis (see :mod:`prunekit.sparsity.layout`). Ties are broken deterministically: among equal
scores the entry with the lower index is kept, so counts are always exact.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .layout import from_matrix, to_matrix


@dataclass(frozen=True)
class Unstructured:
    """Any entry may be pruned."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """Keep at most ``n`` of every ``m`` consecutive weights along the input axis."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise ValueError(f"pattern N:M needs integers 0 < N < M, got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Unstructured | NM


def parse_pattern(pattern: "str | Pattern") -> Pattern:
    """``"unstructured"``, ``"2:4"`` or a pattern object -> pattern object."""
    if isinstance(pattern, (Unstructured, NM)):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be 'unstructured', 'N:M' or a pattern object, got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return Unstructured()
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    return NM(int(match.group(1)), int(match.group(2)))


def topk_keep(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k`` highest scores along the last dim (ties: lower index kept).

    ``k`` may be an int or a tensor of per-row counts broadcastable to ``scores.shape[:-1]``.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    arange = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    ranks.scatter_(-1, order, arange)
    k = torch.as_tensor(k, device=scores.device)
    return ranks < k.unsqueeze(-1) if k.dim() > 0 else ranks < k


def keep_count(numel: int, sparsity: float) -> int:
    """Entries kept at ``sparsity``: the pruned count is rounded once, per group."""
    return numel - int(round(sparsity * numel))


def row_prune_counts(rows: int, width: int, sparsity: float) -> torch.Tensor:
    """Entries pruned in each row, summing exactly to ``round(sparsity * rows * width)``: every
    row prunes ``floor`` or ``ceil`` of ``sparsity * width``, the extra entries spread evenly
    and deterministically (row ``i`` prunes ``c(i+1) - c(i)``, ``c(i) = floor(i * total / rows)``)."""
    total = rows * width - keep_count(rows * width, sparsity)
    cum = torch.arange(rows + 1, dtype=torch.int64) * total // max(rows, 1)
    return cum[1:] - cum[:-1]


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity * n)`` lowest scores of the tensor; with
    ``per_row`` the comparison is within each output row (Wanda, Sun et al. 2023, sec. 3) and the
    layer's count stays exact when a row's share is not a whole number (:func:`row_prune_counts`)."""
    if not per_row:
        return topk_keep(scores.reshape(-1), keep_count(scores.numel(), sparsity)).view_as(scores)
    mat = to_matrix(scores)
    keep = mat.shape[1] - row_prune_counts(*mat.shape, sparsity).to(mat.device)
    return from_matrix(topk_keep(mat, keep), scores.shape)


def nm_mask(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores in every group of ``m`` input columns."""
    mat = to_matrix(scores)
    if mat.shape[1] % pattern.m:
        raise ValueError(
            f"N:M pattern {pattern} needs the input dimension to be a multiple of {pattern.m}, "
            f"got {mat.shape[1]}; skip this layer or use another pattern"
        )
    groups = mat.reshape(mat.shape[0], mat.shape[1] // pattern.m, pattern.m)
    keep = topk_keep(groups, pattern.n).reshape_as(mat)
    return from_matrix(keep, scores.shape)


def check_nm(mask: torch.Tensor, pattern: NM) -> bool:
    """True when every group of ``m`` input columns keeps at most ``n`` entries."""
    mat = to_matrix(mask)
    if mat.shape[1] % pattern.m:
        return False
    return bool((mat.reshape(mat.shape[0], mat.shape[1] // pattern.m, pattern.m).sum(-1) <= pattern.n).all())
