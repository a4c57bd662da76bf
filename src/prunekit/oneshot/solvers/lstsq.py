"""Exact least-squares refit of a layer on a fixed sparse support.

Once a support has been chosen (magnitude, Wanda, SparseGPT, ...), the best surviving weights
for the layer-wise objective ``mean((X_s W'^T - X_t W0^T)^2)`` are a separate ridge-damped
least-squares problem per output row:

    w_i[S_i] = (H_SS + delta I)^-1 (C w0_i)[S_i],   w_i[not S_i] = 0,
    H = X_s^T X_s / N,  C = X_s^T X_t / N,  delta = damp * mean(diag H).

This is the ceiling for any fixed-mask layer-wise update (SparseGPT's OBS update approximates
it: Frantar & Alistarh 2023, sec. 3; SNOWS warm-starts from it: Lucas & Mazumder 2025). Only the statistics ``H`` (and ``C`` for a dense-path target) are needed, never ``X``.
"""
from __future__ import annotations

import torch

__all__ = ["lstsq_refit", "reconstruction_error"]

#: cap on the bytes of the batched ``[rows, k, k]`` float64 submatrices (plus their gather index)
CHUNK_BYTES = 256 * 2**20


def _solve_spd_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for a batch of (normally) SPD ``a`` ``[r, k, k]``, ``b`` ``[r, k]``.

    Batched Cholesky; the systems whose factorisation fails fall back to a minimum-norm
    least-squares solve (``gelsd``), which also covers singular ones.
    """
    lower, info = torch.linalg.cholesky_ex(a)
    # two triangular solves (much faster than cholesky_solve for one right-hand side on CPU)
    y = torch.linalg.solve_triangular(lower, b.unsqueeze(-1), upper=False)
    x = torch.linalg.solve_triangular(lower.mT, y, upper=True).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        a_bad, b_bad = a[bad], b[bad].unsqueeze(-1)
        if a.device.type == "cpu":
            sol = torch.linalg.lstsq(a_bad, b_bad, driver="gelsd").solution
        else:  # only "gels" on CUDA, which needs full rank; use the pseudo-inverse there
            sol = torch.linalg.pinv(a_bad, hermitian=True) @ b_bad
        x[bad] = sol.squeeze(-1)
    return x


def check_refit_shapes(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                       cross: torch.Tensor | None) -> None:
    """A ValueError naming the argument unless ``weight`` is ``[d_out, d_in]``, ``mask`` has its
    shape and ``hessian`` / ``cross`` (when given) are ``[d_in, d_in]`` (every refit's inputs)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if tuple(mask.shape) != (d_out, d_in):
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    for name, m in (("hessian", hessian), ("cross", cross)):
        if m is not None and tuple(m.shape) != (d_in, d_in):
            raise ValueError(f"{name} must be [{d_in}, {d_in}], got {tuple(m.shape)}")


def lstsq_refit(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor | None = None,
    *,
    damp: float = 1e-4,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Per-row exact least squares of ``weight`` ``[d_out, d_in]`` on the support ``mask``.

    ``hessian`` = ``X_s^T X_s / N``; ``cross`` = ``X_s^T X_t / N`` (None: ``X_t = X_s``, so
    ``C = H``). Returns the refitted matrix in the input dtype, exactly 0 off ``mask``; rows with
    an empty support are all zero. Solved in ``dtype`` (float64 by default).

    Cost: ``O(sum_i k_i^3)`` flops for rows with ``k_i`` kept weights (one Cholesky each) plus
    ``O(d_out d_in^2)`` for ``C W0^T``. Rows are grouped by support size and solved as batches
    of ``[rows, k, k]`` submatrices, chunked so one batch stays under :data:`CHUNK_BYTES`
    (e.g. d_in = 3072 at 50%: ~1.5 Gflop per row; 1536 rows take a few minutes on 2 cores).
    """
    check_refit_shapes(weight, mask, hessian, cross)
    d_out, d_in = weight.shape
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")

    dev = weight.device
    f64 = dtype
    w0 = weight.detach().to(f64)
    H = hessian.detach().to(device=dev, dtype=f64)
    C = H if cross is None else cross.detach().to(device=dev, dtype=f64)
    keep = mask.detach().to(device=dev, dtype=torch.bool)
    delta = damp * float(torch.diagonal(H).mean()) if d_in else 0.0

    rhs_full = w0 @ C.T  # row i = C w0_i
    out = torch.zeros(d_out, d_in, dtype=f64, device=dev)
    sizes = keep.sum(dim=1)
    # sorted column indices of each row's support come first (stable sort: True before False)
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices
    h_flat = H.reshape(-1)
    for k in torch.unique(sizes).tolist():
        if k == 0:
            continue  # empty support: the row stays exactly zero
        rows = torch.nonzero(sizes == k).squeeze(1)
        per_row = (torch.finfo(f64).bits // 8 + 8) * k * k  # submatrix + int64 gather index
        chunk = max(1, CHUNK_BYTES // per_row)
        eye = torch.eye(k, dtype=f64, device=dev) * delta
        for start in range(0, rows.numel(), chunk):
            r = rows[start : start + chunk]
            idx = order[r, :k]  # [r, k]
            flat = idx.unsqueeze(2) * d_in + idx.unsqueeze(1)  # [r, k, k]
            a = h_flat[flat]
            del flat
            a += eye
            b = torch.gather(rhs_full[r], 1, idx)
            x = _solve_spd_batch(a, b)
            del a
            out[r.unsqueeze(1), idx] = x
    return out.to(weight.dtype)


def reconstruction_error(
    weight_new: torch.Tensor,
    weight_ref: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor | None = None,
    hessian_t: torch.Tensor | None = None,
) -> float:
    """Layer-wise objective ``mean((X_s W'^T - X_t W0^T)^2)`` from second moments only.

    ``= [tr(W' H W'^T) - 2 tr(W' C W0^T) + tr(W0 H_t W0^T)] / d_out`` with ``H = X_s^T X_s / N``,
    ``C = X_s^T X_t / N``, ``H_t = X_t^T X_t / N``; the mean runs over the ``N`` rows and
    ``d_out`` outputs. With ``cross`` and ``hessian_t`` both None, ``X_t = X_s`` and it is
    computed as ``tr(D H D^T) / d_out``, ``D = W' - W0`` (no cancellation). A dense-path target
    needs both ``cross`` and ``hessian_t``. Computed in float64.
    """
    if (cross is None) != (hessian_t is None):
        raise ValueError("reconstruction_error needs both cross (X_s^T X_t / N) and hessian_t (X_t^T X_t / N), or neither")
    f64 = torch.float64
    wn = weight_new.detach().to(f64)
    w0 = weight_ref.detach().to(device=wn.device, dtype=f64)
    if wn.shape != w0.shape or wn.dim() != 2:
        raise ValueError(f"weights must be matching 2-D matrices, got {tuple(wn.shape)} and {tuple(w0.shape)}")
    H = hessian.detach().to(device=wn.device, dtype=f64)
    d_out = wn.shape[0]
    if cross is None:
        d = wn - w0
        total = ((d @ H) * d).sum()
    else:
        C = cross.detach().to(device=wn.device, dtype=f64)
        Ht = hessian_t.detach().to(device=wn.device, dtype=f64)
        total = ((wn @ H) * wn).sum() - 2.0 * ((wn @ C) * w0).sum() + ((w0 @ Ht) * w0).sum()
    return float(total) / d_out
