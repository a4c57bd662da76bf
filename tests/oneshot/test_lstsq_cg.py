"""Batched CG least squares (SNOWS's warm start on large layers) against the exact per-row solve
and a dense explicit-X oracle."""
from __future__ import annotations

import pytest
import torch

from prunekit.oneshot.solvers import lstsq_cg as cg
from prunekit.oneshot.solvers.lstsq import lstsq_refit

F64 = torch.float64


def _problem(seed: int, n: int, d_in: int, d_out: int, density: float = 0.5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=F64) / d_in**0.5 + torch.eye(d_in, dtype=F64)
    x = torch.randn(n, d_in, generator=g, dtype=F64) @ mix  # correlated features
    w0 = torch.randn(d_out, d_in, generator=g, dtype=F64)
    mask = torch.rand(d_out, d_in, generator=g) < density
    return x, w0.to(dtype), mask, (x.T @ x / n).to(dtype)


def _objective(w, w0, h, damp):
    """Per-row sum of ``1/2 w^T (H + delta I) w - (H w0_i)^T w`` (the ridge problem both solve)."""
    w, w0, h = w.double(), w0.double(), h.double()
    delta = damp * float(torch.diagonal(h).mean())
    return float(0.5 * ((w @ h) * w).sum() + 0.5 * delta * (w * w).sum() - ((w @ h) * w0).sum())


def test_converged_cg_is_the_explicit_x_least_squares_solution():
    x, w0, mask, h = _problem(0, 300, 20, 6)
    mask[2] = False  # an empty support stays zero
    w = cg.lstsq_cg(w0, mask, h, damp=0.0, max_iter=200, tol=1e-12, dtype=F64)
    target = x @ w0.T
    for i in range(6):  # oracle: torch.linalg.lstsq on the explicit X, row by row
        s = torch.nonzero(mask[i]).squeeze(1)
        ref = torch.zeros(20, dtype=F64)
        if s.numel():
            ref[s] = torch.linalg.lstsq(x[:, s], target[:, i : i + 1]).solution.squeeze(1)
        assert torch.allclose(w[i], ref, rtol=1e-6, atol=1e-8)
    assert (w[~mask] == 0).all()


def test_capped_float32_cg_reaches_the_exact_objective_and_never_rises():
    # d_in 96 > the 30 iterations allowed: the cap, not exhaustion of the Krylov space, stops it.
    _, w0, mask, h = _problem(1, 2000, 96, 24, dtype=torch.float32)
    exact = lstsq_refit(w0, mask, h, damp=1e-4, dtype=F64)
    f_exact, f_start = _objective(exact, w0, h, 1e-4), _objective(w0 * mask, w0, h, 1e-4)
    gaps = []
    for iters in (0, 2, 5, 30):
        w = cg.lstsq_cg(w0, mask, h, damp=1e-4, max_iter=iters, tol=0.0)
        assert w.dtype == torch.float32 and (w[~mask] == 0).all()
        gaps.append((_objective(w, w0, h, 1e-4) - f_exact) / (f_start - f_exact))
    assert gaps[0] == pytest.approx(1.0)  # 0 iterations: the masked start
    assert gaps[1] < gaps[0] and gaps[2] < gaps[1]
    assert gaps[3] < 1e-4  # float32 rounding of the objective is about 1e-6 of f_start - f_exact
    w = cg.lstsq_cg(w0, mask, h, damp=1e-4)  # the defaults: the relative residual stops it
    assert (_objective(w, w0, h, 1e-4) - f_exact) / (f_start - f_exact) < 1e-3


def test_half_precision_weights_are_solved_in_float32():
    _, w0, mask, h = _problem(5, 300, 32, 6, dtype=torch.float32)
    w = cg.lstsq_cg(w0.bfloat16(), mask, h, dtype=torch.bfloat16, max_iter=100, tol=1e-6)
    ref = lstsq_refit(w0.bfloat16().float(), mask, h, dtype=F64)
    assert w.dtype == torch.bfloat16
    assert float((w.float() - ref).norm() / ref.norm()) < 1e-2  # bfloat16 rounding of the result only


def test_a_dense_path_target_uses_the_cross_term():
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(500, 16, generator=g, dtype=F64)
    xs = xt + 0.3 * torch.randn(500, 16, generator=g, dtype=F64)  # the pruned path's inputs drift
    w0 = torch.randn(5, 16, generator=g, dtype=F64)
    mask = torch.rand(5, 16, generator=g) < 0.5
    h, c = xs.T @ xs / 500, xs.T @ xt / 500
    w = cg.lstsq_cg(w0, mask, h, c, damp=1e-8, max_iter=100, tol=1e-12, dtype=F64)
    assert torch.allclose(w, lstsq_refit(w0, mask, h, c, damp=1e-8), rtol=1e-6, atol=1e-9)


def test_the_warm_start_solves_small_layers_exactly_and_large_ones_by_cg():
    _, w0, mask, h = _problem(3, 200, 24, 8, dtype=torch.float32)
    assert cg.uses_exact(mask)
    assert torch.equal(cg.lstsq_warm_start(w0, mask, h), lstsq_refit(w0, mask, h, dtype=torch.float32))
    # 2 full rows of 4608: exact 3 * 2 * 4608^3 / 3 = 2.0e11 flops; CG at its cap 2 * 2 * 4608^2 * 51 = 4.3e9
    assert not cg.uses_exact(torch.ones(2, 4608, dtype=torch.bool))
    assert cg.exact_flops(mask) == pytest.approx(float((mask.sum(1).double() ** 3).sum()) / 3)


def test_large_supports_go_to_cg(monkeypatch):
    _, w0, mask, h = _problem(4, 200, 24, 8, dtype=torch.float32)
    monkeypatch.setattr(cg, "EXACT_SLOWDOWN", 1e9)  # make the exact solve look too dear
    assert torch.equal(cg.lstsq_warm_start(w0, mask, h, max_iter=7), cg.lstsq_cg(w0, mask, h, max_iter=7))


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask must have the weight's shape"),
    ({"hessian": torch.eye(4)}, "hessian must be"),
    ({"max_iter": -1}, "max_iter must be a non-negative integer"),
    ({"tol": -1.0}, "tol and damp must be >= 0"),
])
def test_bad_input_is_refused_before_anything_is_computed(kwargs, message):
    w0 = torch.randn(4, 6)
    args = {"weight": w0.clone(), "mask": torch.ones(4, 6, dtype=torch.bool), "hessian": torch.eye(6), **kwargs}
    with pytest.raises(ValueError, match=message):
        cg.lstsq_cg(**args)
    assert torch.equal(args["weight"], w0)
