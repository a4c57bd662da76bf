"""Stochastic Newton-CG refit of one layer's surviving weights on a fixed mask (SNOWS solver).

SNOWS (Lucas & Mazumder, ICLR 2025) keeps a mask chosen by another method and refits the kept
weights of ONE layer by minimising a reconstruction loss. This module is the generic solver: it
knows nothing about networks, hooks or the K-step lookahead loss; it receives

* ``weight`` -- the ``nn.Parameter`` the loss reads (e.g. ``layer.weight``), changed in place;
* ``mask``   -- a bool tensor of the same shape (True = kept);
* ``loss_fn(batch)`` -- a scalar loss computed from the *current* ``weight`` with a graph to it;
* ``batches`` -- the Newton mini-batches, and ``check_batch`` -- a held-out Armijo batch;
* ``reduce`` (optional) -- sums a tensor over the processes that share the calibration data
  (torch.distributed): each process's ``loss_fn`` is its share of one global loss, and the
  gradient, every Hessian-vector product and every loss value are summed, so all processes take
  the very same steps.

Per mini-batch (one Newton step, as in SNOWS: Lucas & Mazumder 2025, arXiv 2411.18376)::

    l = loss_fn(x);  g = grad(l, W) * Z                       (graph kept: create_graph=True)
    p = CG(v -> (H v) * Z + damping * v,  -g)                  (Pearlmutter HVPs, same graph)
    alpha = Armijo(p) on check_batch;  W <- W + alpha p if accepted, else W unchanged

Choices that differ from the SNOWS reference code on purpose:

* a failed line search REVERTS (the last trial step is not applied);
* every Hessian-vector product is one full double backward (no chunking / block-diagonal H), or,
  with ``gauss_newton``, one forward-mode JVP plus one backward: ``G v = J^T (c J v)``
  (:class:`GaussNewtonHVP`);
* one loss is recorded per Newton step; the stagnation rule ends the current epoch (see
  :func:`newton_cg_refit` for the exact scope);
* CG has a negative-curvature guard (the exact Hessian can be indefinite for transformers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "NewtonCGConfig",
    "SolveStats",
    "MaskedHVP",
    "GaussNewtonHVP",
    "conjugate_gradient",
    "newton_cg_refit",
]


#: sums a tensor over the processes sharing the calibration data (its argument may be consumed)
Reduce = Callable[[Tensor], Tensor]
#: ``batch -> (outputs, jvp)``: the model outputs ``r_i`` (graph to the weight) with their
#: weights ``c_i`` in a loss ``sum_i c_i ||r_i - t_i||^2``, and ``jvp(v) -> [J_i v]`` on the same batch
GaussNewton = Callable[[Any], "tuple[list[tuple[Tensor, float]], Callable[[Tensor], list[Tensor | None]]]"]


def _local(t: Tensor) -> Tensor:
    return t


@dataclass
class NewtonCGConfig:
    """Knobs of the stochastic Newton-CG solver; defaults are the SNOWS CNN reference values.

    ``max_cg`` is the main time knob (each CG iteration costs one double backward).
    ``cg_tol`` and ``damping`` are absolute, so the loss scale matters (keep mean reduction);
    ``relative_tol=True`` stops CG when ``||r|| < cg_tol * ||g||`` instead.
    ``max_backtracks`` is the number of Armijo trials: ``alpha = shrink**j`` for
    ``j = 0 .. max_backtracks - 1`` (reference: 50 trials, smallest 0.9**49).
    The stagnation rule is disabled by ``patience <= 0``. ``hessian_fraction < 1`` computes the
    HVPs on that share of each mini-batch (the gradient still on all of it): a subsampled
    Hessian (Byrd, Chin, Neveitt & Nocedal 2011, "On the use of stochastic Hessian information
    in optimization methods for machine learning"); it needs ``hvp_loss_fn`` in
    :func:`newton_cg_refit`.
    """

    epochs: int = 3
    max_cg: int = 500
    cg_tol: float = 1e-3
    relative_tol: bool = False
    damping: float = 1e-4
    armijo_c: float = 1e-5
    shrink: float = 0.9
    max_backtracks: int = 50
    max_steps: int | None = None
    stagnation: float = 0.995
    patience: int = 5
    hessian_fraction: float = 1.0


@dataclass
class SolveStats:
    """What happened during one :func:`newton_cg_refit` call.

    ``steps`` counts Newton steps (one per mini-batch visited), accepted or not.
    ``cg_iterations`` is the number of Hessian-vector products of each step's CG solve.
    ``losses`` holds one mini-batch loss per step, measured before the step.
    ``alphas`` holds the accepted step size of each step (0.0 when the line search failed or the
    step was skipped); ``check_losses`` the check-batch loss after each step (never increases).
    ``stagnation_stops`` counts epochs ended early by the stagnation rule; ``epochs`` the epochs
    started; ``skipped`` steps with a zero or non-finite direction (no line search run; a
    non-finite one also counts as a failed line search).
    """

    steps: int = 0
    accepted: int = 0
    failed_line_searches: int = 0
    cg_iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    check_loss_before: float = float("nan")
    check_loss_after: float = float("nan")
    negative_curvature: int = 0
    alphas: list[float] = field(default_factory=list)
    check_losses: list[float] = field(default_factory=list)
    stagnation_stops: int = 0
    epochs: int = 0
    skipped: int = 0


# --------------------------------------------------------------------------------------------
# Hessian-vector products restricted to the support
# --------------------------------------------------------------------------------------------


def _float_mask(mask: Tensor, weight: Tensor) -> Tensor:
    """The keep-mask as a 0/1 tensor of ``weight``'s dtype and device (shape checked)."""
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    return mask.to(device=weight.device, dtype=torch.bool).to(weight.dtype)


class MaskedHVP:
    """Repeated support-restricted Hessian-vector products against ONE loss graph.

    The masked gradient ``g = grad(loss, weight) * mask`` is computed once with
    ``create_graph=True``; each call ``hvp(v)`` is then one double backward
    ``grad(<g, v * mask>, weight, retain_graph=True) * mask`` (Pearlmutter), i.e. the exact
    Hessian block ``H_ZZ`` applied to ``v`` (no Gauss-Newton approximation, no chunking).
    Both outputs vanish off the support. Call :meth:`release` (or drop the object) as soon as the
    HVPs are done: the double-backward graph can be large.
    """

    def __init__(self, loss: Tensor, weight: Tensor, mask: Tensor, reduce: Reduce | None = None) -> None:
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self.mask = _float_mask(mask, weight)
        self.weight = weight
        self.reduce = reduce or _local
        (grad,) = torch.autograd.grad(loss, weight, create_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError("the loss does not depend on the weight being refit")
        self._g: Tensor | None = grad * self.mask
        #: masked gradient, detached from the graph (summed over the processes with ``reduce``)
        self.grad: Tensor = self.reduce(self._g.detach().clone())
        # A loss linear in the weight has a gradient without a graph: its Hessian is zero.
        self._linear = not self._g.requires_grad

    def __call__(self, v: Tensor) -> Tensor:
        """``(H v) * mask`` for the Hessian of the loss w.r.t. ``weight`` (``v`` masked first)."""
        if self._g is None:
            raise RuntimeError("MaskedHVP was released")
        v = v.detach() * self.mask
        hv = None
        if not self._linear:
            (hv,) = torch.autograd.grad(
                self._g, self.weight, grad_outputs=v, retain_graph=True, allow_unused=True
            )
        return self.reduce(torch.zeros_like(v) if hv is None else hv * self.mask)

    def release(self) -> None:
        """Drop the reference to the graph so autograd can free it."""
        self._g = None


class GaussNewtonHVP:
    """Support-restricted Gauss-Newton products ``(G v) * mask`` for a squared-error loss.

    For ``L = sum_i c_i ||r_i(W) - t_i||^2`` the Gauss-Newton matrix is
    ``G = sum_i 2 c_i J_i^T J_i`` (``J_i = d r_i / d W``): the Hessian without the terms in the
    outputs' second derivatives, so positive semi-definite, and equal to the Hessian wherever the
    outputs are piecewise linear in ``W`` (ReLU nets, BatchNorm in eval mode; Schraudolph 2002,
    "Fast curvature matrix-vector products for second-order gradient descent"). Each call is
    one forward-mode JVP (``jvp(v)``: the ``J_i v``, no graph) and one ordinary backward through
    the kept graph of ``outputs``: no double backward (slow through depthwise convolutions and
    BatchNorm). Call :meth:`release` when the HVPs are done.
    """

    def __init__(self, outputs: list[tuple[Tensor, float]], jvp: Callable[[Tensor], list[Tensor | None]],
                 weight: Tensor, mask: Tensor, reduce: Reduce | None = None) -> None:
        self.mask = _float_mask(mask, weight)
        self.weight, self.reduce = weight, reduce or _local
        self._outputs: list[Tensor] | None = [r for r, _ in outputs]  # in the order of jvp's results
        self._scales = [2.0 * c for _, c in outputs]
        self._jvp = jvp

    def __call__(self, v: Tensor) -> Tensor:
        """``(G v) * mask`` (``v`` masked first)."""
        if self._outputs is None:
            raise RuntimeError("GaussNewtonHVP was released")
        v = v.detach() * self.mask
        hv = None
        if self._outputs:
            tangents = self._jvp(v)
            pairs = [(r, t * c) for r, t, c in zip(self._outputs, tangents, self._scales)
                     if t is not None and r.requires_grad]
            if pairs:
                (hv,) = torch.autograd.grad([r for r, _ in pairs], self.weight, grad_outputs=[t for _, t in pairs],
                                            retain_graph=True, allow_unused=True)
        return self.reduce(torch.zeros_like(v) if hv is None else hv * self.mask)

    def release(self) -> None:
        """Drop the references to the outputs' graph."""
        self._outputs = None


# --------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.sum(a * b))


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iter: int,
    tol: float,
    relative: bool = False,
) -> tuple[Tensor, int, bool]:
    """Solve ``A p = b`` by plain CG from ``p = 0`` (no preconditioner).

    Stops when ``||r||_2 < tol`` (``< tol * ||b||_2`` if ``relative``) or after ``max_iter``
    iterations. Negative-curvature guard: if a search direction has ``d^T A d <= 0`` the
    current iterate is returned -- on the first iteration that is ``b`` itself (the
    steepest-descent direction ``-g`` when called with ``b = -g``) -- and the flag is set.

    Returns ``(p, iterations, hit_negative_curvature)`` where ``iterations`` is the number of
    ``matvec`` calls made (the cost), including the one that detected negative curvature.
    ``p`` is a linear combination of ``b`` and ``matvec`` outputs, so if both vanish off a
    support, so does ``p``.
    """
    b = b.detach()
    x = torch.zeros_like(b)
    r = b.clone()
    rs = _dot(r, r)
    b_norm = math.sqrt(rs)
    if not math.isfinite(b_norm):
        return x, 0, False
    threshold = tol * b_norm if relative else tol
    if b_norm == 0.0 or b_norm < threshold:
        return x, 0, False
    d = r.clone()
    for it in range(max_iter):
        ad = matvec(d)
        dad = _dot(d, ad)
        if not dad > 0.0:  # also catches NaN
            return (b.clone() if it == 0 else x), it + 1, True
        alpha = rs / dad
        x.add_(d, alpha=alpha)
        r.sub_(ad, alpha=alpha)
        rs_new = _dot(r, r)
        if math.sqrt(rs_new) < threshold:
            return x, it + 1, False
        d.mul_(rs_new / rs).add_(r)
        rs = rs_new
    return x, max_iter, False


# --------------------------------------------------------------------------------------------
# Newton-CG refit
# --------------------------------------------------------------------------------------------


def _check_loss(loss_fn: Callable[[Any], Tensor], batch: Any, reduce: Reduce = _local) -> float:
    with torch.no_grad():
        return float(reduce(loss_fn(batch).detach().clone()))


def _armijo(
    weight: Tensor,
    mask: Tensor,
    w0: Tensor,
    p: Tensor,
    gp: float,
    f0: float,
    loss_fn: Callable[[Any], Tensor],
    check_batch: Any,
    config: NewtonCGConfig,
    reduce: Reduce = _local,
) -> tuple[float, float | None]:
    """Backtracking on the check batch from ``w0`` along ``p``.

    Returns ``(alpha, check_loss)`` of the first trial with
    ``L(w0 + alpha p) <= f0 + c alpha <g, p>``, leaving ``weight`` there; if no trial passes,
    restores ``weight`` to ``w0`` exactly and returns ``(0.0, None)``.
    """
    alpha = 1.0
    for _ in range(config.max_backtracks):
        with torch.no_grad():  # off the mask, w0 holds zeros (and any frozen entries)
            weight.copy_(torch.where(mask, w0 + alpha * p, w0))
        f = _check_loss(loss_fn, check_batch, reduce)
        if f <= f0 + config.armijo_c * alpha * gp:  # False for NaN
            return alpha, f
        alpha *= config.shrink
    with torch.no_grad():
        weight.copy_(w0)
    return 0.0, None


def _stagnated(losses: Sequence[float], patience: int, threshold: float) -> bool:
    """True when the last ``patience`` ratios ``l_i / l_{i-1}`` all exceed ``threshold``."""
    if patience <= 0 or len(losses) < patience + 1:
        return False
    tail = losses[-(patience + 1):]
    for prev, cur in zip(tail[:-1], tail[1:]):
        if prev == 0.0 or not cur / prev > threshold:
            return False
    return True


def newton_cg_refit(
    weight: torch.nn.Parameter,
    mask: Tensor,
    loss_fn: Callable[[Any], Tensor],
    batches: Sequence[Any],
    check_batch: Any,
    config: NewtonCGConfig | None = None,
    progress: bool = False,
    frozen: Tensor | None = None,
    reduce: Reduce | None = None,
    hvp_loss_fn: Callable[[Any], Tensor] | None = None,
    gauss_newton: GaussNewton | None = None,
) -> SolveStats:
    """Refit the kept entries of ``weight`` on the fixed ``mask`` by stochastic Newton-CG.

    ``weight.data`` is multiplied by the mask first and then only changed in place (the
    Parameter object is kept); pruned entries are exactly zero on return. For each epoch and
    each mini-batch, one Newton step: the masked gradient ``g`` of ``loss_fn(batch)``, CG on
    ``(H_ZZ + damping I) p = -g`` with masked HVPs on that batch's graph, then Armijo
    backtracking on ``check_batch`` (evaluated under ``torch.no_grad``). A failed line search
    leaves ``weight`` exactly unchanged and is counted. ``check_batch`` should be held out from
    ``batches`` (a line search on a Newton batch accepts steps that only fit that batch); it may
    be the same batch in full-batch tests.

    Stop rules:

    * stagnation -- the loss history is one value per Newton step, kept across epochs; after a
      step, if the last ``patience`` ratios ``l_i / l_{i-1}`` all exceed ``stagnation``, the
      CURRENT EPOCH ends (the next epoch, if any, starts from the first batch, and the same
      rule is checked again after each of its steps, so a persistently stagnant solve takes a
      single step per remaining epoch). ``patience <= 0`` disables the rule.
    * ``max_steps`` -- the whole solve stops once that many Newton steps were taken.

    ``loss_fn`` must not keep references to graph tensors between calls, so that each step's
    graph is freed before the line search. ``frozen`` (optional, bool like ``weight``) marks
    entries that are neither refit nor zeroed: the rest of a parameter that holds several
    matrices (attention's k and v rows while q is refit). With ``reduce`` (several processes, see the module
    docstring) every process must pass the same number of ``batches``. ``hvp_loss_fn(batch)`` (optional) is
    the loss whose Hessian CG uses (e.g. on part of the batch: ``hessian_fraction``); the
    gradient is always that of ``loss_fn(batch)``. ``gauss_newton(batch)`` (optional) gives CG
    Gauss-Newton products instead of exact HVPs (:class:`GaussNewtonHVP`; it replaces ``hvp_loss_fn``).
    """
    config = NewtonCGConfig() if config is None else config
    if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
        raise ValueError("weight must be a tensor with requires_grad=True that loss_fn reads")
    bool_mask = mask.to(device=weight.device, dtype=torch.bool)
    if tuple(bool_mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    keep = bool_mask if frozen is None else bool_mask | frozen.to(device=weight.device, dtype=torch.bool)
    with torch.no_grad():
        weight.copy_(torch.where(keep, weight, torch.zeros_like(weight)))

    reduce = reduce or _local
    stats = SolveStats()
    stats.check_loss_before = f_check = _check_loss(loss_fn, check_batch, reduce)

    n_batches = len(batches)
    total = config.epochs * n_batches
    if config.max_steps is not None:
        total = min(total, max(config.max_steps, 0))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="newton-cg", unit="step", leave=False)  # the caller chose to show it

    try:
        done = config.max_steps is not None and config.max_steps <= 0
        for _ in range(config.epochs):
            if done or n_batches == 0:
                break
            stats.epochs += 1
            for index, batch in enumerate(batches):
                alpha, its, neg, f_new = _newton_step(
                    weight, bool_mask, loss_fn, batch, check_batch, config, stats, f_check, reduce, hvp_loss_fn,
                    gauss_newton,
                )
                if f_new is not None:
                    f_check = f_new
                stats.steps += 1
                stats.cg_iterations.append(its)
                stats.alphas.append(alpha)
                stats.check_losses.append(f_check)
                stats.negative_curvature += int(neg)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.losses[-1]:.4g}", cg=its, alpha=f"{alpha:.3g}")
                if config.max_steps is not None and stats.steps >= config.max_steps:
                    done = True
                    break
                if index < n_batches - 1 and _stagnated(stats.losses, config.patience, config.stagnation):
                    stats.stagnation_stops += 1
                    break
    finally:
        if bar is not None:
            bar.close()

    stats.check_loss_after = _check_loss(loss_fn, check_batch, reduce)
    return stats


def _newton_step(
    weight: Tensor,
    mask: Tensor,
    loss_fn: Callable[[Any], Tensor],
    batch: Any,
    check_batch: Any,
    config: NewtonCGConfig,
    stats: SolveStats,
    f_check: float,
    reduce: Reduce = _local,
    hvp_loss_fn: Callable[[Any], Tensor] | None = None,
    gauss_newton: GaussNewton | None = None,
) -> tuple[float, int, bool, float | None]:
    """One Newton step on ``batch``; records the batch loss and line-search counters in ``stats``.

    Returns ``(alpha, cg_iterations, hit_negative_curvature, new_check_loss)``; ``alpha == 0``
    and ``new_check_loss is None`` mean ``weight`` was left unchanged.
    """
    loss = loss_fn(batch)
    stats.losses.append(float(reduce(loss.detach().clone())))
    op: MaskedHVP | GaussNewtonHVP
    if gauss_newton is not None:  # gradient without a graph; GN products on the outputs' own graph
        (grad,) = torch.autograd.grad(loss, weight)
        g = reduce(grad * _float_mask(mask, weight))
        op = GaussNewtonHVP(*gauss_newton(batch), weight, mask, reduce)
    elif hvp_loss_fn is None:
        op = MaskedHVP(loss, weight, mask, reduce)
        g = op.grad
    else:  # full-batch gradient (no graph kept), HVPs on the Hessian loss's own graph
        (grad,) = torch.autograd.grad(loss, weight)
        g = reduce(grad * _float_mask(mask, weight))
        op = MaskedHVP(hvp_loss_fn(batch), weight, mask, reduce)
    del loss
    damping = config.damping

    def matvec(v: Tensor) -> Tensor:
        return op(v).add_(v, alpha=damping) if damping else op(v)

    try:
        p, its, neg = conjugate_gradient(
            matvec, -g, max_iter=config.max_cg, tol=config.cg_tol, relative=config.relative_tol
        )
    finally:
        op.release()  # free the double-backward graph before the line search
        del op, matvec

    gp = _dot(g, p)
    if not (math.isfinite(gp) and bool(torch.isfinite(p).all())):
        stats.skipped += 1
        stats.failed_line_searches += 1
        return 0.0, its, neg, None
    if not bool(p.any()):
        stats.skipped += 1  # zero gradient: nothing to do
        return 0.0, its, neg, None

    w0 = weight.detach().clone()
    alpha, f_new = _armijo(weight, mask, w0, p, gp, f_check, loss_fn, check_batch, config, reduce)
    if f_new is None:
        stats.failed_line_searches += 1
        return 0.0, its, neg, None
    stats.accepted += 1
    return alpha, its, neg, f_new
