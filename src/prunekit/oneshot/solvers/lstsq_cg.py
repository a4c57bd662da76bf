"""Least squares on a fixed sparse support by batched preconditioned CG, and the choice between it
and the exact solve (SNOWS's warm start).

The problem is :func:`prunekit.oneshot.solvers.lstsq.lstsq_refit`'s: for every output row ``i``,
minimise ``1/2 w^T (H + delta I) w - (C w0_i)^T w`` over ``w`` zero off the support ``S_i``. The
exact solve factors one ``k_i x k_i`` submatrix per row: on a 512x4608 convolution at 50% that is
512 Cholesky factorisations of 2304x2304 (about 2 Tflop: 118 s on 2 cores in issue 20, 21.7x the
layer's SNOWS Newton steps in ``benchmarks/results/snows_warm_start.md``), for a warm start.
Here every row runs conjugate gradients at once: one ``[d_out, d_in] @ [d_in, d_in]`` product
per iteration, masked, Jacobi preconditioned, started from the masked dense weights and stopped
at a relative residual or an iteration cap.
:func:`lstsq_warm_start` keeps the exact solve where it costs no more time than CG at its cap.
"""
from __future__ import annotations

import torch

from .lstsq import check_refit_shapes, lstsq_refit

__all__ = ["lstsq_cg", "lstsq_warm_start", "uses_exact", "exact_flops", "cg_flops",
           "CG_MAX_ITER", "CG_TOL", "EXACT_SLOWDOWN"]

#: CG iterations at most (each one ``[d_out, d_in] @ [d_in, d_in]`` product)
CG_MAX_ITER = 50
#: a row stops once its residual is this fraction of its starting residual (at the masked weights)
CG_TOL = 1e-3
#: the exact solve's batched Cholesky and gathers run at about a third of a GEMM's flop rate on
#: CPU (2 shared cores, 256x2304 at 50%: 1.3e11 flops in 17 s; 50 CG iterations, 1.4e11 flops, 7 s)
EXACT_SLOWDOWN = 3.0


def lstsq_cg(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor | None = None,
    *,
    damp: float = 1e-4,
    max_iter: int = CG_MAX_ITER,
    tol: float = CG_TOL,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximate :func:`~prunekit.oneshot.solvers.lstsq.lstsq_refit` (same arguments, same
    ``delta = damp * mean(diag H)``) by Jacobi-preconditioned CG on all rows at once.

    Starts from ``weight * mask``; each row stops when its residual is ``tol`` times its starting
    one, all stop after ``max_iter`` iterations. Every iterate lowers each row's objective (CG on an
    SPD system), so a capped run is still no worse than the start. Solved in ``dtype`` (float32
    at least); returns the refit in the weight's dtype, exactly zero off ``mask``. Cost:
    ``2 d_out d_in^2`` flops per iteration.
    """
    check_refit_shapes(weight, mask, hessian, cross)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not tol >= 0 or not damp >= 0:
        raise ValueError(f"tol and damp must be >= 0, got tol={tol!r}, damp={damp!r}")
    dev = weight.device
    if dtype in (torch.float16, torch.bfloat16):  # CG's inner products need float32 at least
        dtype = torch.float32
    H = hessian.detach().to(device=dev, dtype=dtype)
    C = H if cross is None else cross.detach().to(device=dev, dtype=dtype)
    keep = mask.detach().to(device=dev, dtype=dtype)
    delta = damp * float(torch.diagonal(H).mean()) if H.numel() else 0.0
    x = weight.detach().to(dtype) * keep
    b = (weight.detach().to(dtype) @ C.T) * keep  # row i: (C w0_i) on its support
    r = b - (x @ H) * keep - delta * x
    diag = torch.diagonal(H) + delta
    inv = torch.where(diag > 0, 1.0 / diag.clamp_min(torch.finfo(dtype).tiny), torch.ones_like(diag))
    z = r * inv
    p = z.clone()
    rz = (r * z).sum(1)
    stop = tol * r.norm(dim=1)
    active = r.norm(dim=1) > 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = (p @ H) * keep + delta * p
        pq = (p * q).sum(1)
        ok = active & (pq > 0)  # a non-positive curvature (rounding, delta = 0) ends that row
        alpha = torch.where(ok, rz / torch.where(ok, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x += alpha[:, None] * p
        r -= alpha[:, None] * q
        active = ok & (r.norm(dim=1) > stop)
        z = r * inv
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    return (x * keep).to(weight.dtype)


def exact_flops(mask: torch.Tensor) -> float:
    """Flops of the exact solve: one Cholesky (``k^3 / 3``) per row with ``k`` kept weights."""
    k = mask.detach().sum(dim=1).to(torch.float64)
    return float((k ** 3).sum()) / 3.0


def cg_flops(mask: torch.Tensor, max_iter: int = CG_MAX_ITER) -> float:
    """Flops of :func:`lstsq_cg` at its iteration cap: one ``2 d_out d_in^2`` product per iteration."""
    d_out, d_in = mask.shape
    return 2.0 * d_out * d_in * d_in * (max_iter + 1)


def uses_exact(mask: torch.Tensor, max_iter: int = CG_MAX_ITER) -> bool:
    """Whether :func:`lstsq_warm_start` solves exactly on this support (the cheaper of the two)."""
    return EXACT_SLOWDOWN * exact_flops(mask) <= cg_flops(mask, max_iter)


def lstsq_warm_start(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor | None = None,
    *,
    damp: float = 1e-4,
    dtype: torch.dtype = torch.float32,
    max_iter: int = CG_MAX_ITER,
) -> torch.Tensor:
    """SNOWS's least-squares warm start: the exact per-row solve (:func:`lstsq_refit`) when it
    costs no more time than CG at its cap (``EXACT_SLOWDOWN * exact_flops <= cg_flops``: small
    layers, ``d_in`` up to about 800 at 50% with the default cap), else :func:`lstsq_cg`.
    The Newton steps that follow refit the weights anyway, so a warm start within CG's tolerance
    of the exact one is enough; the exact one costs ``O(d_in^3)`` per row."""
    check_refit_shapes(weight, mask, hessian, cross)
    if uses_exact(mask, max_iter):
        return lstsq_refit(weight, mask, hessian, cross, damp=damp, dtype=dtype)
    return lstsq_cg(weight, mask, hessian, cross, damp=damp, max_iter=max_iter, dtype=dtype)
