"""Tests of the SNOWS stochastic Newton-CG solver against independent oracles (float64, seeded)."""
from __future__ import annotations

import math
import weakref

import pytest
import torch

from prunekit.oneshot.solvers import newton_cg as ncg
from prunekit.oneshot.solvers.newton_cg import (
    MaskedHVP,
    NewtonCGConfig,
    SolveStats,
    conjugate_gradient,
    newton_cg_refit,
)


def hvp(loss, weight, mask, v):
    """One masked Pearlmutter HVP, ``(g_masked, Hv_masked)``, through :class:`MaskedHVP`."""
    op = MaskedHVP(loss, weight, mask)
    try:
        return op.grad, op(v)
    finally:
        op.release()


DT = torch.float64


def _mask(shape: tuple[int, ...], keep: float, gen: torch.Generator) -> torch.Tensor:
    """Random keep-mask with at least one kept entry per row."""
    m = torch.rand(shape, generator=gen, dtype=DT) < keep
    m[:, 0] = True
    return m


class _MLP:
    """2-layer tanh MLP whose first-layer weight is the refit parameter; MSE to a target."""

    def __init__(self, seed: int = 0, n: int = 48, d: int = 6, h: int = 5, o: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g, dtype=DT)
        self.w2 = torch.randn(o, h, generator=g, dtype=DT) / math.sqrt(h)
        self.y = torch.randn(n, o, generator=g, dtype=DT)
        self.mask = _mask((h, d), 0.6, g)
        self.weight = torch.nn.Parameter(torch.randn(h, d, generator=g, dtype=DT) / math.sqrt(d))
        self.gen = g

    def loss_at(self, w: torch.Tensor, idx: slice | None = None) -> torch.Tensor:
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return ((torch.tanh(x @ w.T) @ self.w2.T - y) ** 2).mean()

    def loss_fn(self, idx: slice | None = None) -> torch.Tensor:
        return self.loss_at(self.weight, idx)

    def grad_at(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss_at(w), w)
        return g


# ------------------------------------------------------------------------------------------ HVP


def test_hvp_matches_central_finite_differences() -> None:
    m = _MLP(seed=1)
    with torch.no_grad():
        m.weight.mul_(m.mask)
    v = torch.randn(m.weight.shape, generator=m.gen, dtype=DT) * m.mask
    g, hv = hvp(m.loss_fn(), m.weight, m.mask, v)

    eps = 1e-5
    w = m.weight.detach()
    fd = (m.grad_at(w + eps * v) - m.grad_at(w - eps * v)) / (2 * eps)
    fd_s, hv_s = fd[m.mask], hv[m.mask]
    assert torch.linalg.norm(hv_s - fd_s) / torch.linalg.norm(fd_s) < 1e-3
    # gradient agrees with plain autograd on the support
    torch.testing.assert_close(g[m.mask], m.grad_at(w)[m.mask], rtol=1e-12, atol=1e-14)


def test_hvp_symmetric_and_repeatable_on_one_graph() -> None:
    m = _MLP(seed=2)
    u = torch.randn(m.weight.shape, generator=m.gen, dtype=DT)
    v = torch.randn(m.weight.shape, generator=m.gen, dtype=DT)
    op = MaskedHVP(m.loss_fn(), m.weight, m.mask)
    hu, hv = op(u), op(v)
    hv_again = op(v)  # many HVPs against the same graph
    op.release()
    assert torch.equal(hv, hv_again)
    a, b = float((u * m.mask * hv).sum()), float((v * m.mask * hu).sum())
    assert abs(a - b) <= 1e-10 * max(1.0, abs(a))
    # the one-shot helper agrees with the reusable operator
    _, hv_single = hvp(m.loss_fn(), m.weight, m.mask, v)
    torch.testing.assert_close(hv_single, hv, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError):
        op(v)


def test_hvp_and_gradient_vanish_off_support() -> None:
    m = _MLP(seed=3)  # weight NOT masked: pruned entries still influence the loss
    v = torch.randn(m.weight.shape, generator=m.gen, dtype=DT)  # v dense on purpose
    g, hv = hvp(m.loss_fn(), m.weight, m.mask, v)
    assert torch.count_nonzero(g[~m.mask]) == 0
    assert torch.count_nonzero(hv[~m.mask]) == 0
    assert torch.count_nonzero(hv[m.mask]) > 0


def test_hvp_of_linear_loss_is_zero() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4, dtype=DT))
    c = torch.randn(3, 4, dtype=DT)
    mask = torch.ones(3, 4, dtype=torch.bool)
    g, hv = hvp((w * c).sum(), w, mask, torch.randn(3, 4, dtype=DT))
    torch.testing.assert_close(g, c)
    assert torch.count_nonzero(hv) == 0


# ------------------------------------------------------------------------------------------- CG


def test_cg_matches_linalg_solve_on_spd_system() -> None:
    g = torch.Generator().manual_seed(4)
    n = 12
    q = torch.randn(n, n, generator=g, dtype=DT)
    a = q @ q.T + 0.5 * torch.eye(n, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT)
    x, its, neg = conjugate_gradient(lambda v: a @ v, b, max_iter=200, tol=1e-12)
    ref = torch.linalg.solve(a, b)
    assert not neg and its <= 200
    assert torch.linalg.norm(x - ref) / torch.linalg.norm(ref) < 1e-8

    # relative tolerance: stops as soon as ||r|| < tol * ||b||
    scale = 1e3
    x2, its2, _ = conjugate_gradient(lambda v: a @ v, scale * b, max_iter=200, tol=1e-3, relative=True)
    assert torch.linalg.norm(scale * b - a @ x2) < 1e-3 * scale * torch.linalg.norm(b)
    # the same absolute tolerance needs more iterations on the scaled system
    _, its_abs, _ = conjugate_gradient(lambda v: a @ v, scale * b, max_iter=200, tol=1e-3)
    assert its_abs >= its2

    # an iteration cap is honoured
    _, its3, _ = conjugate_gradient(lambda v: a @ v, b, max_iter=3, tol=0.0)
    assert its3 == 3


def test_cg_negative_curvature_on_first_iteration_returns_b() -> None:
    a = torch.diag(torch.tensor([1.0, -10.0], dtype=DT))
    b = torch.tensor([1.0, 1.0], dtype=DT)  # b^T A b = -9 < 0
    x, its, neg = conjugate_gradient(lambda v: a @ v, b, max_iter=50, tol=1e-12)
    assert neg and its == 1
    assert torch.equal(x, b) and x is not b


def test_cg_negative_curvature_later_returns_current_iterate() -> None:
    a = torch.diag(torch.tensor([10.0, -1.0], dtype=DT))
    b = torch.tensor([1.0, 1.0], dtype=DT)
    # by hand: d0 = b, d0^T A d0 = 9 > 0, x1 = (2/9) b; d1 = (22, 220)/81 has d1^T A d1 < 0
    x, its, neg = conjugate_gradient(lambda v: a @ v, b, max_iter=50, tol=1e-12)
    assert neg and its == 2
    torch.testing.assert_close(x, torch.full((2,), 2.0 / 9.0, dtype=DT))


def test_cg_zero_rhs() -> None:
    b = torch.zeros(5, dtype=DT)
    x, its, neg = conjugate_gradient(lambda v: v, b, max_iter=10, tol=1e-3, relative=True)
    assert its == 0 and not neg and torch.count_nonzero(x) == 0


# ----------------------------------------------------------------------- refit: least squares oracle


def _least_squares_problem(seed: int, n: int = 120, d: int = 10, m: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(m, d, generator=g, dtype=DT)
    y = x @ w_true.T + 0.3 * torch.randn(n, m, generator=g, dtype=DT)
    mask = _mask((m, d), 0.5, g)
    weight = torch.nn.Parameter(torch.randn(m, d, generator=g, dtype=DT))
    return x, y, mask, weight


def test_full_batch_refit_equals_per_row_least_squares() -> None:
    x, y, mask, weight = _least_squares_problem(5)
    param_id = id(weight)

    def loss_fn(batch):
        xb, yb = batch
        return ((xb @ weight.T - yb) ** 2).mean()

    cfg = NewtonCGConfig(epochs=4, max_cg=100, cg_tol=1e-12)
    stats = newton_cg_refit(weight, mask, loss_fn, [(x, y)], (x, y), cfg)

    ref = torch.zeros_like(weight)
    for k in range(weight.shape[0]):
        s = mask[k]
        ref[k, s] = torch.linalg.lstsq(x[:, s], y[:, k : k + 1]).solution[:, 0]
    err = torch.linalg.norm(weight.detach() - ref) / torch.linalg.norm(ref)
    assert err < 1e-3, float(err)
    assert id(weight) == param_id and weight.grad is None
    assert stats.accepted >= 1 and stats.check_loss_after < stats.check_loss_before
    assert len(stats.losses) == stats.steps == len(stats.cg_iterations) == len(stats.alphas)
    assert stats.alphas[0] == 1.0  # a full Newton step passes Armijo on a quadratic


# ------------------------------------------------------------------------- refit: mask and Armijo


def test_mask_intact_and_cg_vectors_on_support(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _MLP(seed=6)
    assert torch.count_nonzero(m.weight.detach()[~m.mask]) > 0  # starts dense off the support
    seen: list[torch.Tensor] = []
    real_cg = ncg.conjugate_gradient

    def spy(matvec, b, **kw):
        def wrapped(v):
            out = matvec(v)
            seen.extend([v.clone(), out.clone()])
            return out

        seen.append(b.clone())
        p, its, neg = real_cg(wrapped, b, **kw)
        seen.append(p.clone())
        return p, its, neg

    monkeypatch.setattr(ncg, "conjugate_gradient", spy)
    cfg = NewtonCGConfig(epochs=2, max_cg=20, cg_tol=1e-10)
    batches = [slice(0, 24), slice(24, 40)]
    stats = newton_cg_refit(m.weight, m.mask, lambda idx: m.loss_fn(idx), batches, slice(40, 48), cfg)
    assert stats.steps == 4 and len(seen) > 8
    for t in seen:
        assert torch.count_nonzero(t[~m.mask]) == 0
    assert torch.count_nonzero(m.weight.detach()[~m.mask]) == 0


def test_accepted_steps_never_raise_check_loss() -> None:
    m = _MLP(seed=7, n=96)
    batches = [slice(i, i + 16) for i in range(0, 80, 16)]
    cfg = NewtonCGConfig(epochs=3, max_cg=30, cg_tol=1e-8, patience=0)
    stats = newton_cg_refit(m.weight, m.mask, lambda idx: m.loss_fn(idx), batches, slice(80, 96), cfg)
    assert stats.steps == 15 and stats.accepted >= 1
    chain = [stats.check_loss_before] + stats.check_losses
    assert all(b <= a for a, b in zip(chain[:-1], chain[1:]))
    assert stats.check_loss_after == pytest.approx(chain[-1], rel=1e-12)
    assert stats.check_loss_after < stats.check_loss_before
    assert torch.count_nonzero(m.weight.detach()[~m.mask]) == 0


def test_reduce_sums_every_gradient_hvp_and_loss() -> None:
    """Two identical "processes" holding half the loss each, summed by ``reduce``, take exactly
    the steps of one process (halving and doubling are exact in floating point)."""
    cfg = NewtonCGConfig(epochs=2, max_cg=30, cg_tol=1e-8, patience=0)
    batches = [slice(i, i + 16) for i in range(0, 80, 16)]
    plain, halves = _MLP(seed=7, n=96), _MLP(seed=7, n=96)
    one = newton_cg_refit(plain.weight, plain.mask, plain.loss_fn, batches, slice(80, 96), cfg)
    sizes: list[int] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t * 2

    two = newton_cg_refit(halves.weight, halves.mask, lambda idx: 0.5 * halves.loss_fn(idx), batches,
                          slice(80, 96), cfg, reduce=reduce)
    assert torch.equal(halves.weight, plain.weight)
    assert (two.losses, two.alphas, two.cg_iterations, two.check_losses) == (
        one.losses, one.alphas, one.cg_iterations, one.check_losses)
    assert one.accepted >= 1
    # one gradient per step and one product per CG iteration, all of the weight's size
    assert sizes.count(plain.weight.numel()) == one.steps + sum(one.cg_iterations)


def _unpassable_problem(seed: int):
    """Newton batches pull W towards a least-squares fit; the check batch penalises any move."""
    x, y, mask, weight = _least_squares_problem(seed)
    with torch.no_grad():
        weight.mul_(mask)
    w_start = weight.detach().clone()
    calls = {"check": 0}

    def loss_fn(batch):
        if batch == "check":
            calls["check"] += 1
            return ((weight - w_start) ** 2).sum()  # any step p != 0 raises it above 0 > c a <g,p>
        return ((x[batch] @ weight.T - y[batch]) ** 2).mean()

    return weight, mask, w_start, loss_fn, calls


def test_failed_line_search_reverts_exactly() -> None:
    weight, mask, w_start, loss_fn, calls = _unpassable_problem(8)
    cfg = NewtonCGConfig(epochs=1, max_cg=50, cg_tol=1e-10, max_backtracks=7, patience=0)
    stats = newton_cg_refit(weight, mask, loss_fn, [slice(0, 60), slice(60, 120)], "check", cfg)
    assert torch.equal(weight.detach(), w_start)  # the last trial (0.9**6) is NOT applied
    assert stats.steps == 2 and stats.accepted == 0 and stats.failed_line_searches == 2
    assert stats.alphas == [0.0, 0.0]
    assert calls["check"] == 1 + 2 * 7 + 1  # before, 7 trials per step, after
    assert stats.check_loss_after == stats.check_loss_before == 0.0


# --------------------------------------------------------------------------------- stop rules


def test_stagnation_ends_the_epoch_with_history_kept_across_epochs() -> None:
    weight, mask, _, loss_fn, _ = _unpassable_problem(9)  # W never moves: every ratio is 1.0
    batches = [slice(0, 60)] * 20  # the same batch 20 times: losses are exactly constant
    cfg = NewtonCGConfig(epochs=3, max_cg=5, max_backtracks=2, patience=5, stagnation=0.995)
    stats = newton_cg_refit(weight, mask, loss_fn, batches, "check", cfg)
    # epoch 1: 6 losses give 5 ratios > 0.995 -> end; epochs 2, 3: one more stagnant ratio each
    assert stats.epochs == 3 and stats.stagnation_stops == 3
    assert stats.steps == 6 + 1 + 1 == len(stats.losses)

    # a falling loss never triggers it
    assert not ncg._stagnated([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], 5, 0.995)
    assert not ncg._stagnated([1.0, 1.0, 1.0, 1.0, 0.9, 0.9], 5, 0.995)
    assert ncg._stagnated([5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 5, 0.995)


def test_stagnation_disabled_and_max_steps() -> None:
    weight, mask, _, loss_fn, _ = _unpassable_problem(10)
    batches = [slice(0, 60)] * 4
    off = NewtonCGConfig(epochs=2, max_cg=5, max_backtracks=1, patience=0)
    stats = newton_cg_refit(weight, mask, loss_fn, batches, "check", off)
    assert stats.steps == 8 and stats.stagnation_stops == 0 and stats.epochs == 2

    capped = NewtonCGConfig(epochs=3, max_cg=5, max_backtracks=1, patience=0, max_steps=6)
    stats = newton_cg_refit(weight, mask, loss_fn, batches, "check", capped)
    assert stats.steps == 6 == len(stats.losses) == len(stats.cg_iterations) and stats.epochs == 2

    zero = NewtonCGConfig(max_steps=0)
    stats = newton_cg_refit(weight, mask, loss_fn, batches, "check", zero)
    assert stats.steps == 0 and stats.losses == []


def test_progress_bar_and_input_validation() -> None:
    x, y, mask, weight = _least_squares_problem(11, n=40)

    def loss_fn(batch):
        return ((x @ weight.T - y) ** 2).mean()

    stats = newton_cg_refit(weight, mask, loss_fn, [0], 0, NewtonCGConfig(epochs=1, max_cg=5), progress=True)
    assert isinstance(stats, SolveStats) and stats.steps == 1
    with pytest.raises(ValueError):
        newton_cg_refit(weight, mask.T, loss_fn, [0], 0)
    frozen = torch.zeros(4, 10, dtype=DT)
    with pytest.raises(ValueError):
        newton_cg_refit(frozen, mask, loss_fn, [0], 0)


class _Tag:
    pass


class _TaggedIdentity(torch.autograd.Function):
    """Identity whose graph node owns a sentinel: the sentinel dies exactly when the graph does."""

    refs: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.tag = _Tag()
        _TaggedIdentity.refs.append(weakref.ref(ctx.tag))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_step_graph_is_freed_before_the_line_search() -> None:
    x, y, mask, weight = _least_squares_problem(12, n=40)
    _TaggedIdentity.refs = []
    alive_at_check: list[int] = []

    def loss_fn(batch):
        if batch == "check":
            alive_at_check.append(sum(r() is not None for r in _TaggedIdentity.refs))
        w = _TaggedIdentity.apply(weight) if torch.is_grad_enabled() else weight
        return ((x @ w.T - y) ** 2).mean()

    stats = newton_cg_refit(weight, mask, loss_fn, ["a", "b"], "check", NewtonCGConfig(epochs=1, max_cg=10))
    assert stats.steps == 2 and len(_TaggedIdentity.refs) == 2
    assert alive_at_check and max(alive_at_check) == 0


# ------------------------------------------------------------------------------- Gauss-Newton


def _gauss_newton_fn(m: "_MLP", w: torch.Tensor):
    """``batch -> (outputs, jvp)`` for ``m``'s loss (mean over ``n * o`` elements) at weight ``w``."""
    def outputs(weight, idx):
        return torch.tanh(m.x[idx] @ weight.T) @ m.w2.T

    def fn(idx):
        out = outputs(w, idx)

        def jvp(v):
            return [torch.func.jvp(lambda a: outputs(a, idx), (w.detach(),), (v,))[1]]
        return [(out, 1.0 / out.numel())], jvp
    return fn


def test_gauss_newton_products_are_j_transpose_j_on_the_support() -> None:
    m = _MLP(seed=11)
    idx = slice(0, 48)
    outputs, jvp = _gauss_newton_fn(m, m.weight)(idx)
    op = ncg.GaussNewtonHVP(outputs, jvp, m.weight, m.mask)
    jac = torch.autograd.functional.jacobian(
        lambda w: torch.tanh(m.x @ w.T) @ m.w2.T, m.weight.detach()).reshape(-1, m.weight.numel())
    gauss = 2.0 / (48 * 3) * jac.T @ jac  # G of the mean squared error
    z = m.mask.reshape(-1).to(DT)
    for _ in range(3):
        v = torch.randn(m.weight.shape, generator=m.gen, dtype=DT)
        expected = (z * (gauss @ (z * v.reshape(-1)))).reshape(m.weight.shape)
        assert torch.allclose(op(v), expected, rtol=1e-10, atol=1e-12)
    # tanh is curved: the exact Hessian differs from G (the test can tell them apart)
    _, exact = hvp(m.loss_fn(idx), m.weight, m.mask, v)
    assert not torch.allclose(exact, op(v), rtol=1e-3)
    op.release()
    with pytest.raises(RuntimeError, match="released"):
        op(v)


def test_gauss_newton_refit_solves_least_squares_and_reduces() -> None:
    x, y, mask, weight = _least_squares_problem(5)
    sizes: list[int] = []

    def loss_fn(batch):
        xb, yb = batch
        return ((xb @ weight.T - yb) ** 2).mean()

    def gauss_newton(batch):
        xb, _ = batch
        out = xb @ weight.T
        return [(out, 1.0 / out.numel())], lambda v: [xb @ v.T]

    def reduce(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    cfg = NewtonCGConfig(epochs=4, max_cg=100, cg_tol=1e-12)
    stats = newton_cg_refit(weight, mask, loss_fn, [(x, y)], (x, y), cfg, reduce=reduce,
                            gauss_newton=gauss_newton)
    ref = torch.zeros_like(weight)
    for k in range(weight.shape[0]):
        s = mask[k]
        ref[k, s] = torch.linalg.lstsq(x[:, s], y[:, k: k + 1]).solution[:, 0]
    assert torch.linalg.norm(weight.detach() - ref) / torch.linalg.norm(ref) < 1e-3
    assert stats.alphas[0] == 1.0 and torch.count_nonzero(weight.detach()[~mask]) == 0
    assert sizes.count(weight.numel()) == stats.steps + sum(stats.cg_iterations)
