"""Least-squares refit and reconstruction error against explicit-X oracles."""
from __future__ import annotations

import pytest
import torch

from prunekit.oneshot.solvers.lstsq import lstsq_refit, reconstruction_error

F64 = torch.float64


def _data(seed: int, n: int, d_in: int, d_out: int, density: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=F64) / d_in**0.5 + torch.eye(d_in, dtype=F64)
    x = torch.randn(n, d_in, generator=g, dtype=F64) @ mix  # correlated features
    w0 = torch.randn(d_out, d_in, generator=g, dtype=F64)
    mask = torch.rand(d_out, d_in, generator=g) < density
    return g, x, w0, mask


def _oracle(xs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row: argmin ||xs[:, S] w_S - target[:, i]|| with torch.linalg.lstsq on explicit X."""
    out = torch.zeros(mask.shape, dtype=F64)
    for i in range(mask.shape[0]):
        s = torch.nonzero(mask[i]).squeeze(1)
        if s.numel():
            out[i, s] = torch.linalg.lstsq(xs[:, s], target[:, i : i + 1]).solution.squeeze(1)
    return out


def test_matches_dense_lstsq_and_zero_structure():
    _, x, w0, mask = _data(0, 400, 24, 10)
    mask[3] = False  # empty support
    mask[4] = True  # full support
    n = x.shape[0]
    h = x.T @ x / n
    w = lstsq_refit(w0, mask, h, damp=1e-10)
    ref = _oracle(x, x @ w0.T, mask)
    assert torch.linalg.norm(w - ref) / torch.linalg.norm(ref) < 1e-6
    assert (w[~mask] == 0).all()
    assert (w[3] == 0).all()
    # full support: the dense weight is its own optimum
    assert torch.allclose(w[4], w0[4], rtol=1e-7, atol=1e-8)


def test_residual_of_normal_equations():
    _, x, w0, mask = _data(1, 200, 20, 8)
    h = x.T @ x / x.shape[0]
    damp = 1e-2  # a visible ridge, so the residual really checks delta
    w = lstsq_refit(w0, mask, h, damp=damp)
    delta = damp * torch.diagonal(h).mean()
    rhs = w0 @ h.T
    for i in range(w0.shape[0]):
        s = torch.nonzero(mask[i]).squeeze(1)
        res = (h[s][:, s] + delta * torch.eye(s.numel(), dtype=F64)) @ w[i, s] - rhs[i, s]
        assert res.abs().max() < 1e-10


def test_cross_target_matches_explicit_lstsq():
    g, xs, w0, mask = _data(2, 500, 16, 7)
    xt = xs + 0.3 * torch.randn(xs.shape, generator=g, dtype=F64)  # dense-path inputs differ
    n = xs.shape[0]
    h, c = xs.T @ xs / n, xs.T @ xt / n
    w = lstsq_refit(w0, mask, h, c, damp=1e-10)
    ref = _oracle(xs, xt @ w0.T, mask)
    assert torch.linalg.norm(w - ref) / torch.linalg.norm(ref) < 1e-6
    assert (w[~mask] == 0).all()


def test_dtype_chunking_and_singular_fallback(monkeypatch):
    import prunekit.oneshot.solvers.lstsq as mod

    _, x, w0, mask = _data(3, 300, 12, 9)
    h = x.T @ x / x.shape[0]
    full = lstsq_refit(w0, mask, h, damp=1e-10)
    monkeypatch.setattr(mod, "CHUNK_BYTES", 1)  # one row per batch
    chunked = lstsq_refit(w0.float(), mask, h.float(), damp=1e-10)
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked.double(), full, rtol=1e-4, atol=1e-4)
    # rank-deficient H with no damping: Cholesky fails, min-norm fallback still fits X exactly
    xr = x[:, :6] @ torch.randn(6, 12, dtype=F64, generator=torch.Generator().manual_seed(9))
    hr = xr.T @ xr / xr.shape[0]
    wr = lstsq_refit(w0, torch.ones_like(mask), hr, damp=0.0)
    assert torch.isfinite(wr).all()
    assert reconstruction_error(wr, w0, hr) < 1e-12 * reconstruction_error(torch.zeros_like(w0), w0, hr)


@pytest.mark.parametrize("cross_target", [False, True])
def test_reconstruction_error_equals_explicit_mean(cross_target):
    g, xs, w0, mask = _data(4, 300, 14, 6)
    xt = xs + 0.5 * torch.randn(xs.shape, generator=g, dtype=F64) if cross_target else xs
    n = xs.shape[0]
    wn = torch.randn(w0.shape, generator=g, dtype=F64) * mask
    explicit = float(((xs @ wn.T - xt @ w0.T) ** 2).mean())
    if cross_target:
        got = reconstruction_error(wn, w0, xs.T @ xs / n, xs.T @ xt / n, xt.T @ xt / n)
    else:
        got = reconstruction_error(wn, w0, xs.T @ xs / n)
    assert got == pytest.approx(explicit, rel=1e-10)
    with pytest.raises(ValueError):
        reconstruction_error(wn, w0, xs.T @ xs / n, cross=xs.T @ xt / n)


def test_refit_is_optimal_for_its_mask():
    _, x, w0, mask = _data(5, 400, 16, 5)
    h = x.T @ x / x.shape[0]
    w = lstsq_refit(w0, mask, h, damp=1e-10)
    best = reconstruction_error(w, w0, h)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        other = w + 1e-3 * torch.randn(w.shape, generator=g, dtype=F64) * mask
        assert reconstruction_error(other, w0, h) > best
    assert best < reconstruction_error(w0 * mask, w0, h)
