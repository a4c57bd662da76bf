"""Removing whole input columns of a consumer matrix, and repairing the columns that stay.

Structured pruning (an MLP neuron, an attention head, a channel) deletes a *group* of input
columns of the layer that consumes it, ``W`` ``[d_out, d_in]``. Everything here works on that
matrix and the statistics of its inputs, ``X_s`` (what the pruned model feeds it) and ``X_t``
(what the dense model feeds it), normalised by the ``N`` rows seen:

    H = X_s^T X_s / N,   C = X_s^T X_t / N,   mu_s = mean(X_s),   mu_t = mean(X_t)

Scores rank groups (lower = removed first); :func:`obs_remove` removes greedily by the exact
second-order cost (ZipLM); :func:`refit_columns` is the exact least-squares refit of the kept
columns (optionally with a bias) to the dense layer's output. The math: shared/specs/structured.md.
"""
from __future__ import annotations

import torch

__all__ = ["SCORES", "ObsState", "group_scores", "obs_remove", "refit_columns", "output_error"]

SCORES = ("magnitude", "wanda", "flap", "obs")


def group_scores(score: str, weight: torch.Tensor, groups: torch.Tensor, *, sq_mean: torch.Tensor | None = None,
                 variance: torch.Tensor | None = None) -> torch.Tensor:
    """One score per group (``groups`` ``[n_groups, k]`` column indices; lower = removed first).

    ``magnitude``: ``sum ||W[:, j]||^2``; ``wanda`` (activation-aware): ``sum ||W[:, j]||^2 E[x_j^2]``;
    ``flap`` (FLAP's fluctuation): ``sum ||W[:, j]||^2 Var[x_j]``."""
    col = weight.double().pow(2).sum(0)
    if score == "wanda":
        col = col * sq_mean.double()
    elif score == "flap":
        col = col * variance.double()
    elif score != "magnitude":
        raise ValueError(f"score must be one of magnitude, wanda, flap (obs: obs_remove), got {score!r}")
    return col[groups].sum(1)


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.double().clone()
    mean = h.diagonal().mean().clamp_min(1e-12)
    h.diagonal().add_(damp * mean)
    return h


class ObsState:
    """One consumer's matrix and inverse (damped) Hessian while groups of its input columns are
    removed greedily by OBS: :meth:`costs` prices removing each candidate group now, :meth:`remove`
    takes one out and updates the remaining columns (SparseGPT's / ZipLM's update). Several
    states can be priced together (a CNN channel read by several consumers: the costs add up)."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> None:
        self.w = weight.double().clone()
        self.hinv = torch.linalg.inv(_damped(hessian, damp))

    def costs(self, idx: torch.Tensor) -> torch.Tensor:
        """``tr(W_g (Hinv_gg)^-1 W_g^T)`` for each row of ``idx`` (``[g, k]`` column indices)."""
        w, hinv = self.w, self.hinv
        if idx.shape[1] == 1:  # single columns (MLP neurons): ||W[:, j]||^2 / Hinv_jj
            j = idx[:, 0]
            return w[:, j].pow(2).sum(0) / hinv[j, j]
        sub = hinv[idx.unsqueeze(-1), idx.unsqueeze(-2)]           # [g, k, k]
        wg = w[:, idx].permute(1, 0, 2)                            # [g, d_out, k]
        return (torch.linalg.solve(sub, wg.mT).mT * wg).sum((1, 2))  # tr(W_g sub^-1 W_g^T)

    def remove(self, r: torch.Tensor) -> None:
        """Remove the columns ``r``: ``W <- W - W_R (Hinv_RR)^-1 Hinv_R,:``, downdate ``Hinv``."""
        w, hinv = self.w, self.hinv
        if len(r) == 1:  # rank-one updates in place
            j, scale = int(r[0]), -1.0 / float(hinv[r[0], r[0]])
            row = hinv[j].clone()
            w.addr_(w[:, j].clone(), row, alpha=scale)
            hinv.addr_(row, row, alpha=scale)
        else:
            inv_rr = torch.linalg.inv(hinv[r][:, r])
            w -= w[:, r] @ inv_rr @ hinv[r, :]
            hinv -= hinv[:, r] @ inv_rr @ hinv[r, :]
        w[:, r] = 0


def obs_remove(weight: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor, count: int, *,
               damp: float = 0.01, buckets: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedily remove ``count`` groups by the OBS cost ``tr(W_R (Hinv_RR)^-1 W_R^T)``, updating the
    rest after each removal (``W <- W - W_R (Hinv_RR)^-1 Hinv_R,:``) and downdating ``Hinv``.

    ``buckets`` (a bucket id per group): remove the same number from every bucket (grouped-query
    attention: query heads per key/value group stay equal). Returns the removed group indices in
    removal order and the updated matrix (removed columns zero). Ties break towards the lower
    group index, so the result is deterministic."""
    state = ObsState(weight, hessian, damp)
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    removed: list[int] = []
    quota = None
    if buckets is not None:
        n_buckets = int(buckets.max()) + 1
        if count % n_buckets:
            raise ValueError(f"count {count} is not a multiple of the {n_buckets} buckets")
        quota = torch.full((n_buckets,), count // n_buckets)
    for _ in range(count):
        allowed = alive if quota is None else alive & (quota[buckets] > 0)
        cost = state.costs(groups[allowed])
        best = int(torch.nonzero(allowed)[int(torch.argmin(cost))])
        if quota is not None:
            quota[buckets[best]] -= 1
        state.remove(groups[best])
        alive[best] = False
        removed.append(best)
    return removed, state.w.to(weight.dtype)


def refit_columns(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, *,
                  cross: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  mean_s: torch.Tensor | None = None, mean_t: torch.Tensor | None = None,
                  fit_bias: bool = False, damp: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact least squares of the kept columns ``keep`` (indices) to the dense output:

        min || X_s[:, S] W_S^T + 1 b'^T  -  (X_t W^T + 1 b^T) ||^2

    (``cross`` None: ``X_t = X_s``; ``bias`` None: ``b = 0``). With ``fit_bias`` the bias ``b'``
    is solved jointly (a ones column appended to ``X_s``; needs ``mean_s`` and, with ``cross``,
    ``mean_t``), else ``b' = b``. Returns ``(W_S [d_out, |S|], b')``. The ridge term
    ``delta ||W_S - W[:, S]||^2`` (``delta = damp * mean(diag H_SS)``) pulls towards the kept dense
    columns, not towards zero: a large ``damp`` gives back plain dropping, never something worse,
    and it tempers the fit to the calibration rows. Solved in float64."""
    w = weight.double()
    c = hessian.double() if cross is None else cross.double()
    h_kept = hessian.double()[keep][:, keep]
    delta = damp * float(h_kept.diagonal().mean().clamp_min(1e-12))
    h_ss = h_kept + delta * torch.eye(len(keep), dtype=torch.float64, device=w.device)
    rhs = c[keep] @ w.T + delta * w[:, keep].T                      # [|S|, d_out]
    b = None if bias is None else bias.double()
    if not fit_bias:  # a kept bias b is on both sides and cancels
        sol = torch.linalg.solve(h_ss, rhs)
        return sol.T.to(weight.dtype), bias
    if mean_s is None or (cross is not None and mean_t is None):
        raise ValueError("fit_bias needs mean_s (and mean_t with a cross term)")
    mu_s = mean_s.double()[keep]
    mu_t = (mean_s if cross is None else mean_t).double()
    k = len(keep)
    a = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=w.device)
    a[:k, :k], a[:k, k], a[k, :k], a[k, k] = h_ss, mu_s, mu_s, 1.0
    top = rhs + (0 if b is None else torch.outer(mu_s, b))
    bottom = (mu_t @ w.T) + (0 if b is None else b)
    sol = torch.linalg.solve(a, torch.cat([top, bottom.unsqueeze(0)]))
    return sol[:k].T.to(weight.dtype), sol[k].to(weight.dtype)


def output_error(weight: torch.Tensor, keep: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor, *,
                 cross: torch.Tensor | None = None, target_gram: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, new_bias: torch.Tensor | None = None,
                 mean_s: torch.Tensor | None = None, mean_t: torch.Tensor | None = None) -> float:
    """``mean_rows || X_s[:, S] W'^T + b' - (X_t W^T + b) ||^2`` from the statistics alone (summed
    over outputs): how far the repaired layer's output is from the dense one. ``target_gram`` is
    ``X_t^T X_t / N`` (None: the same inputs, ``X_t = X_s``)."""
    w, wn = weight.double(), new_weight.double()
    h = hessian.double()
    c = h if cross is None else cross.double()
    t = h if target_gram is None else target_gram.double()
    err = (wn @ h[keep][:, keep] * wn).sum() - 2 * (wn @ c[keep] * w).sum() + (w @ t * w).sum()
    db = None
    if bias is not None or new_bias is not None:
        b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
        bn = b if new_bias is None else new_bias.double()
        mu_s = mean_s.double()
        mu_t = mu_s if mean_t is None else mean_t.double()
        db = bn - b
        err = err + 2 * (db * (wn @ mu_s[keep] - w @ mu_t)).sum() + (db * db).sum()
    return float(err)
