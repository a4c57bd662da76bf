"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight updates.

Pure-tensor layer solver: given one layer's weight matrix ``W`` ``[d_out, d_in]`` (columns in
the canonical order of :mod:`prunekit.sparsity.layout`) and the Hessian ``H = X^T X / N`` of its
calibration inputs, choose a sparse support (adaptive, block-wise, or a given mask) and update
the surviving weights column by column with Optimal Brain Surgeon steps that share one inverse
Hessian across all rows. It approximately solves ``min ||X W'^T - X W^T||_F^2`` over sparse
``W'``; the steps follow Algorithm 1 of Frantar & Alistarh 2023 ("SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", sec. 3).

Differences from the reference code (IST-DASLab/sparsegpt), all deliberate:

* Counts are exact. The reference prunes every ``score <= sorted[int(s n)]`` (one extra entry
  plus ties); here each column block prunes an exact count chosen by top-k with deterministic
  tie-breaking (lower flat index ``row * width + col`` is kept among equal scores), and the
  per-block counts are made to sum to ``round(s * d_out * d_in)`` for the layer (see
  :func:`block_prune_counts`).
* N:M keeps exactly ``N`` of every ``M`` columns per row (ties: lower column kept).
* A failed Cholesky factorisation is retried with ten times the dampening, up to 5 times.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from ...sparsity.patterns import NM, Unstructured, keep_count, topk_keep

__all__ = ["SparseGPTResult", "sparsegpt", "block_prune_counts"]

#: above this input width the solver works in float32 (with Cholesky), below in float64
FLOAT64_MAX_DIN = 2048
#: how many times the dampening is multiplied by 10 after a failed Cholesky
MAX_DAMP_RETRIES = 5


@dataclass
class SparseGPTResult:
    """Output of :func:`sparsegpt`.

    ``weight``: updated ``[d_out, d_in]`` matrix in the input dtype, exactly 0 off ``mask``
    (dead input columns are also 0, even where ``mask`` keeps them, unless ``dead_inputs="keep"``).
    ``mask``: bool keep-mask (True = weight survives) with the exact pruned counts.
    ``error``: ``sum(e^2) / 2`` over all OBS steps, which equals
    ``0.5 * tr(dW (H + lambda I) dW^T)`` for the (damped) Hessian as given, ``dW = W' - W``
    (with ``H = X^T X / N`` that is ``0.5 * d_out * mean((X W'^T - X W^T)^2)`` up to damping).
    ``damp_used``: the relative dampening finally used; ``cholesky_retries``: how many times it
    had to be raised.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    damp_used: float
    cholesky_retries: int = 0


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Disable TF32 matmuls (CUDA) for the duration of the block, restoring the old setting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = old


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def block_prune_counts(d_out: int, d_in: int, sparsity: float, block_size: int) -> list[int]:
    """Entries to prune in each column block, summing exactly to ``round(sparsity * d_out * d_in)``.

    Cumulative rounding: block ``[a, b)`` prunes ``c(b) - c(a)`` with
    ``c(x) = floor(sparsity * d_out * x + 0.5)`` for inner boundaries and
    ``c(d_in) = round(sparsity * d_out * d_in)`` (the layer-exact count, same rounding as
    :func:`prunekit.sparsity.patterns.keep_count`). Each block's count is therefore within one entry of
    ``round(sparsity * d_out * width)`` (the narrow last block included) and the counts add up
    to the layer total exactly.
    """
    total = d_out * d_in - keep_count(d_out * d_in, sparsity)  # one rounding of sparsity * numel, as masks do
    bounds = list(range(0, d_in, block_size)) + [d_in]
    cum = [_round_half_up(sparsity * d_out * b) for b in bounds[:-1]] + [total]
    cum[0] = 0
    counts = []
    for i in range(len(bounds) - 1):
        cap = d_out * (bounds[i + 1] - bounds[i])
        counts.append(min(max(cum[i + 1] - cum[i], 0), cap))
    if sum(counts) != total:  # cannot happen for 0 <= sparsity <= 1; kept as a guard
        raise AssertionError(f"block counts {counts} do not sum to {total}")
    return counts


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`prunekit.sparsity.patterns.topk_keep` of a 1-D tensor (ties: lower index kept) by selection
    (``kthvalue``) instead of a full sort."""
    n = scores.numel()
    if k <= 0 or k >= n:
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest score
    if not bool(torch.isfinite(threshold)):
        return topk_keep(scores, k)
    keep = scores > threshold
    tied = scores == threshold
    return keep | (tied & (tied.cumsum(0) <= k - int(keep.sum())))


def _inner_width(pattern: Unstructured | NM | None) -> int:
    """Columns updated one by one before a matrix product catches the rest of the block up:
    16, or the multiple of M nearest above it under N:M (groups never straddle chunks)."""
    m = pattern.m if isinstance(pattern, NM) else 1
    return m * max(1, -(-16 // m))


def _upper_inverse_cholesky(
    h: torch.Tensor, damp: float
) -> tuple[torch.Tensor, float, int]:
    """``U`` upper with ``(H + lambda I)^-1 = U^T U``, ``lambda = damp * mean(diag H)``.

    Retries with ``damp * 10`` up to :data:`MAX_DAMP_RETRIES` times when a factorisation fails.
    """
    mean_diag = torch.diagonal(h).mean()
    idx = torch.arange(h.shape[0], device=h.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        hd = h.clone()
        hd[idx, idx] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        del hd  # each d_in x d_in intermediate is freed as soon as it is used (peak memory)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if retry:
                    warnings.warn(
                        f"sparsegpt: Cholesky failed, dampening raised to {damp:g} after "
                        f"{retry} retr{'y' if retry == 1 else 'ies'}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return upper, damp, retry
        if retry < MAX_DAMP_RETRIES:
            damp *= 10.0
    raise RuntimeError(
        f"sparsegpt: Cholesky of the damped Hessian failed even with dampening {damp:g} "
        f"({MAX_DAMP_RETRIES} retries); the Hessian is not positive semi-definite"
    )


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Unstructured | NM,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    dead_inputs: str = "zero",
) -> SparseGPTResult:
    """Prune one layer with SparseGPT and return the updated weight and keep-mask.

    ``weight``: ``[d_out, d_in]`` (not modified). ``hessian``: ``X^T X / N`` ``[d_in, d_in]``
    (any positive scale). ``sparsity``: fraction pruned for :class:`Unstructured` (exactly
    ``round(sparsity * d_out * d_in)`` in the layer, about that fraction in every block of
    ``block_size`` columns); ignored for :class:`NM`, where every row keeps exactly ``N`` of each
    ``M`` consecutive columns. ``mask`` (bool, True = keep): skip the selection, keep this support
    and apply only the OBS updates (``pattern``/``sparsity`` are then not used).
    ``dead_inputs``: what happens to the weights of input columns that are zero in every sample
    (``diag H == 0``): ``"zero"`` (the reference: set to zero, so pruned first and zero even where
    kept) or ``"keep"`` (chosen on their dense values, scored as inputs of the mean live energy,
    and left at their dense values where kept: the layer keeps exactly its requested count).

    Cost: one ``d_in^3`` inverse-Cholesky plus ``O(d_out * d_in * block_size)`` for the in-block
    updates and ``O(d_out * d_in^2)`` for the lazy batch updates. Works in ``dtype``
    (float32, as the reference, is the default on accelerators); with None or float64, in
    float64 when ``d_in <= 2048``, float32 otherwise.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt expects a 2-D weight matrix [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"hessian must be [{d_in}, {d_in}] for a weight of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if dead_inputs not in ("zero", "keep"):
        raise ValueError(f"dead_inputs must be 'zero' or 'keep', got {dead_inputs!r}")
    if mask is not None:
        if tuple(mask.shape) != (d_out, d_in):
            raise ValueError(f"mask must have shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
    elif isinstance(pattern, NM):
        if d_in % pattern.m:
            raise ValueError(
                f"N:M pattern {pattern} needs the input dimension to be a multiple of {pattern.m}, "
                f"got {d_in}; skip this layer or use another pattern"
            )
        if block_size % pattern.m:
            raise ValueError(f"sparsegpt with N:M pattern {pattern} needs block_size % {pattern.m} == 0, got block_size={block_size}")
    elif isinstance(pattern, Unstructured):
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    else:
        raise TypeError(f"pattern must be Unstructured() or NM(n, m), got {pattern!r}")

    if dtype == torch.float32:
        work = torch.float32
    else:
        work = torch.float64 if d_in <= FLOAT64_MAX_DIN else torch.float32
    W = weight.detach().to(work).clone()
    H = hessian.detach().to(device=weight.device, dtype=work).clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError("sparsegpt: the Hessian contains NaN or Inf")
    dead = torch.diagonal(H) == 0
    keep_dead = dead_inputs == "keep" and bool(dead.any())
    if keep_dead:  # scored as inputs of the mean live energy; their weights stay dense if kept
        live = torch.diagonal(H)[~dead]
        H[dead, dead] = live.mean() if live.numel() else 1.0
    else:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

    selecting = mask is None
    if selecting and isinstance(pattern, Unstructured) and keep_count(d_out * d_in, sparsity) == d_out * d_in:
        # nothing to prune: W is unchanged except for the dead columns
        keep = torch.ones(d_out, d_in, dtype=torch.bool, device=weight.device)
        return SparseGPTResult(W.to(weight.dtype), keep, 0.0, float(damp), 0)

    with _no_tf32():
        U, damp_used, retries = _upper_inverse_cholesky(H, float(damp))
        del H
        keep = torch.empty(d_out, d_in, dtype=torch.bool, device=weight.device)
        counts = (
            block_prune_counts(d_out, d_in, sparsity, block_size)
            if selecting and isinstance(pattern, Unstructured)
            else None
        )
        err_sq = torch.zeros((), dtype=work, device=weight.device)
        step = _inner_width(pattern if selecting else None)
        for b, a in enumerate(range(0, d_in, block_size)):
            e = min(a + block_size, d_in)
            width = e - a
            W1 = W[:, a:e].clone()
            U1 = U[a:e, a:e]
            diag = torch.diagonal(U1)
            E1 = torch.zeros_like(W1)
            # scale[r, i] = 1 / U[i, i] where entry (r, i) is pruned, else 0: the OBS error of
            # column i is then W1[:, i] * scale[:, i] (zero on kept entries).
            scale = torch.zeros_like(W1)
            if not selecting:
                keep1 = mask[:, a:e].clone()
            elif counts is not None:  # unstructured: adaptive selection over the whole block
                scores = (W1.square() / diag.square()).reshape(-1)
                keep1 = _keep_top(scores, d_out * width - counts[b]).view(d_out, width)
            else:
                keep1 = torch.zeros(d_out, width, dtype=torch.bool, device=weight.device)
            nm = selecting and isinstance(pattern, NM)
            if not nm:
                torch.div(~keep1, diag, out=scale)
            # Columns in chunks of ``step``: rank-1 OBS updates inside a chunk, one matrix
            # product for the rest of the block after it (the lazy batch of sec. 3, nested).
            for c in range(0, width, step):
                ce = min(c + step, width)
                for i in range(c, ce):
                    if nm and i % pattern.m == 0:
                        grp = W1[:, i : i + pattern.m].square() / diag[i : i + pattern.m].square()
                        keep1[:, i : i + pattern.m] = topk_keep(grp, pattern.n)
                        torch.div(~keep1[:, i : i + pattern.m], diag[i : i + pattern.m], out=scale[:, i : i + pattern.m])
                    err = torch.mul(W1[:, i], scale[:, i], out=E1[:, i])
                    if i + 1 < ce:
                        W1[:, i + 1 : ce].addr_(err, U1[i, i + 1 : ce], alpha=-1)
                if ce < width:
                    W1[:, ce:].addmm_(E1[:, c:ce], U1[c:ce, ce:], alpha=-1)
            W[:, a:e] = W1
            keep[:, a:e] = keep1
            err_sq += E1.square().sum()
            if e < d_in:
                W[:, e:].addmm_(E1, U[a:e, e:], alpha=-1)  # lazy batch update
    if not keep_dead:
        W[:, dead] = 0.0
    W[~keep] = 0.0
    return SparseGPTResult(W.to(weight.dtype), keep, float(err_sq) / 2.0, damp_used, retries)
