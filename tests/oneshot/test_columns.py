"""Column-group removal and refit, against independent oracles: a dense least-squares solve on
the explicit inputs, brute force over single removals, and the residual computed from X."""
import itertools

import pytest
import torch

from prunekit.oneshot.solvers.columns import group_scores, obs_remove, output_error, refit_columns


def _problem(n=400, d_in=12, d_out=5, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    xs = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix + shift
    xt = xs + 0.1 * torch.randn(n, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    return xs, xt, w, b


def _stats(xs, xt):
    n = xs.shape[0]
    return xs.T @ xs / n, xs.T @ xt / n, xt.T @ xt / n, xs.mean(0), xt.mean(0)


@pytest.mark.parametrize("fit_bias", [False, True])
@pytest.mark.parametrize("dense_target", [False, True])
def test_refit_equals_a_dense_least_squares_solve(fit_bias, dense_target):
    xs, xt, w, b = _problem(shift=0.5)
    if not dense_target:
        xt = xs
    h, c, t, ms, mt = _stats(xs, xt)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    target = xt @ w.T + b
    design = torch.cat([xs[:, keep], torch.ones(len(xs), 1, dtype=xs.dtype)], 1) if fit_bias else xs[:, keep]
    rhs = target if fit_bias else target - b
    oracle = torch.linalg.lstsq(design, rhs).solution.T      # [d_out, k (+1)]
    w_s, b_s = refit_columns(w, keep, h, cross=None if not dense_target else c, bias=b, mean_s=ms,
                             mean_t=mt, fit_bias=fit_bias, damp=0.0)
    torch.testing.assert_close(w_s, oracle[:, :len(keep)], rtol=1e-8, atol=1e-8)
    if fit_bias:
        torch.testing.assert_close(b_s, oracle[:, -1], rtol=1e-8, atol=1e-8)
    else:
        assert b_s is b
    # the error computed from the statistics equals the residual computed from X
    residual = xs[:, keep] @ w_s.T + b_s - target
    err = output_error(w, keep, w_s, h, cross=c if dense_target else None, target_gram=t if dense_target else None,
                       bias=b, new_bias=b_s, mean_s=ms, mean_t=mt)
    assert err == pytest.approx(float(residual.pow(2).sum(1).mean()), rel=1e-8, abs=1e-10)


def test_obs_cost_is_the_error_of_the_best_refit_after_one_removal():
    """With no damping, removing group g and re-fitting the rest optimally raises the output error
    by exactly OBS's cost: so the greedy first pick is the brute-force best single removal."""
    xs, _, w, _ = _problem(d_in=8)
    h = xs.T @ xs / len(xs)
    groups = torch.arange(8).view(4, 2)
    errors = []
    for g in range(4):
        keep = torch.cat([groups[i] for i in range(4) if i != g])
        w_s, _ = refit_columns(w, keep, h, damp=0.0)
        errors.append(output_error(w, keep, w_s, h))
    removed, w_obs = obs_remove(w, h, groups, 1, damp=0.0)
    assert removed == [min(range(4), key=errors.__getitem__)]
    keep = torch.cat([groups[i] for i in range(4) if i != removed[0]])
    # OBS's update of the rest IS the optimal refit (same quadratic, exact algebra)
    w_best, _ = refit_columns(w, keep, h, damp=0.0)
    torch.testing.assert_close(w_obs[:, keep], w_best, rtol=1e-7, atol=1e-9)
    assert torch.all(w_obs[:, groups[removed[0]]] == 0)


def test_obs_greedy_matches_brute_force_on_a_tiny_problem_for_its_chosen_pair():
    xs, _, w, _ = _problem(d_in=6, seed=3)
    h = xs.T @ xs / len(xs)
    groups = torch.arange(6).view(6, 1)
    removed, w_obs = obs_remove(w, h, groups, 2, damp=0.0)
    keep = torch.tensor([j for j in range(6) if j not in removed])
    best = min(itertools.combinations(range(6), 2),
               key=lambda r: output_error(w, torch.tensor([j for j in range(6) if j not in r]),
                                          refit_columns(w, torch.tensor([j for j in range(6) if j not in r]), h,
                                                        damp=0.0)[0], h))
    err_greedy = output_error(w, keep, w_obs[:, keep], h)
    err_best = output_error(w, torch.tensor([j for j in range(6) if j not in best]),
                            refit_columns(w, torch.tensor([j for j in range(6) if j not in best]), h, damp=0.0)[0], h)
    assert err_greedy >= err_best - 1e-9        # brute force is the floor
    assert err_greedy <= 1.5 * err_best + 1e-9  # and greedy lands near it here


def test_scores_follow_their_definitions_and_rank_deterministically():
    w = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    groups = torch.tensor([[0, 1], [2, 3]])
    sq = torch.tensor([1.0, 4.0, 9.0, 16.0])
    var = torch.tensor([0.5, 0.5, 2.0, 2.0])
    assert group_scores("magnitude", w, groups).tolist() == [6.0, 2.0]
    assert group_scores("wanda", w, groups, sq_mean=sq).tolist() == [2 + 16.0, 32.0]
    assert group_scores("flap", w, groups, variance=var).tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="score must be one of"):
        group_scores("taylor", w, groups)


def test_the_ridge_pulls_towards_the_kept_dense_columns_not_zero():
    """A huge damp gives back plain dropping (W[:, S]); a small one the least-squares fit."""
    xs, _, w, _ = _problem()
    h = xs.T @ xs / len(xs)
    keep = torch.tensor([1, 2, 5, 9])
    far, _ = refit_columns(w, keep, h, damp=1e9)
    torch.testing.assert_close(far, w[:, keep], rtol=1e-6, atol=1e-6)
    near, _ = refit_columns(w, keep, h, damp=1e-12)
    exact, _ = refit_columns(w, keep, h, damp=0.0)
    torch.testing.assert_close(near, exact, rtol=1e-6, atol=1e-8)
    errors = [output_error(w, keep, refit_columns(w, keep, h, damp=d)[0], h) for d in (0.0, 0.1, 10.0, 1e9)]
    assert errors == sorted(errors)  # more pull towards W[:, S], more output error on these rows
