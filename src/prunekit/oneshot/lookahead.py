"""SNOWS: refit one layer's surviving weights against a K-operation lookahead loss.

The loss compares the first K+1 *measured* tensors (the layer's own output, then the outputs
of later prunable layers, activations and attention modules, in execution order, across block
boundaries) of two sub-networks fed the same pruned-path block input: S, the current model,
and D, the same modules with the block's pruned layers given back their dense weights
(Lucas & Mazumder 2025, "Preserving Deep Representations in One-Shot Pruning", arXiv
2411.18376). It is minimised on the fixed support by Newton-CG
(:mod:`prunekit.oneshot.solvers.newton_cg`). Which operations are measured is the user's choice
(:func:`measured_rule`); the default is :func:`is_measured`.

With several processes (torch.distributed, :mod:`prunekit.oneshot.runtime.ranks`) the i-th Newton step
uses every rank's i-th batch and the line search every rank's held-out batch: each rank's loss
is weighted by its share of the step's elements and the solver sums gradients, Hessian-vector
products and losses, so the ranks solve one problem on all the data.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..calls import first_input
from .blocks import StopForward, run_chain, swapped_weights
from .solvers.newton_cg import GaussNewton, NewtonCGConfig, SolveStats, newton_cg_refit
from .runtime.ranks import Ranks
from .runtime.placement import float32_working_copy

ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Mish, nn.Softplus,
)
# Residual shortcuts hold a prunable conv but are not on the main path whose outputs the
# lookahead compares: measuring them would count the same output twice (after the addition).
NOT_MEASURED = ("shortcut", "downsample")
#: how Hessian-vector products are computed (see :func:`snows_refit`)
HVP_MODES = ("exact", "gauss_newton")
#: ``(full module name, module, ids of prunable layers) -> measured?``
MeasuredRule = Callable[[str, nn.Module, "set[int]"], bool]


def is_measured(name: str, module: nn.Module, targets: set[int]) -> bool:
    """Default measured operations: prunable layers (not residual shortcuts), activations, and
    attention modules. Attention is recognised by class name ("...Attention", as in every
    transformers model and in ``nn.MultiheadAttention``) because no common base class exists;
    its output is the first place where the pruned q/k/v projections meet."""
    if any(part in name for part in NOT_MEASURED):
        return False
    if id(module) in targets or isinstance(module, ACTIVATION_TYPES):
        return True
    cls = type(module)
    return cls.__module__.startswith("transformers.activations") or (
        "Attention" in cls.__name__ and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
    )


def measured_rule(spec: Any) -> MeasuredRule:
    """The measured-operation rule from a user's choice: None (the default,
    :func:`is_measured`), a predicate ``(name, module) -> bool``, or a list of module types
    and name regexes (a module is measured when it is an instance of one of the types or its
    full name matches one of the regexes). The layer being refit is always measured."""
    if spec is None:
        return is_measured
    if callable(spec) and not isinstance(spec, type):
        return lambda name, module, targets: bool(spec(name, module))
    types = tuple(s for s in spec if isinstance(s, type))
    regexes = [re.compile(s) for s in spec if isinstance(s, str)]
    return lambda name, module, targets: isinstance(module, types) or any(r.search(name) for r in regexes)


class Lookahead:
    """The K-step lookahead loss of one layer, on stored block inputs."""

    def __init__(
        self,
        chain: Sequence[tuple[str, nn.Module]],
        layer: nn.Module,
        k: int,
        targets: set[int],
        block_layers: dict[str, nn.Module],
        dense_weights: dict[str, torch.Tensor],
        measured_by: MeasuredRule = is_measured,
    ) -> None:
        self.chain = [m for _, m in chain]
        self.layer, self.k = layer, k
        self.block_layers, self.dense_weights = block_layers, dense_weights
        self.captured: list[torch.Tensor] = []
        self.active = False
        measured = {}
        for prefix, block in chain:
            for name, module in block.named_modules():
                full = f"{prefix}.{name}" if prefix and name else (prefix or name)
                if module is layer or measured_by(full, module, targets):
                    measured[id(module)] = module
        self.handles = [m.register_forward_hook(self._hook) for m in measured.values()]

    def _hook(self, module, _args, output):
        if module is self.layer:
            self.active = True
        if not self.active:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, torch.Tensor) or any(out is c for c in self.captured):
            return
        self.captured.append(out.clone())
        if len(self.captured) == self.k + 1:
            raise StopForward

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The first K+1 measured tensors of the current model on one block input."""
        self.captured, self.active = [], False
        try:
            run_chain(self.chain, args, kwargs)
        except StopForward:
            pass
        out, self.captured = self.captured, []
        return out

    @torch.no_grad()
    def dense_tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The same tensors from D (the block's pruned layers restored to dense)."""
        with swapped_weights(self.block_layers, self.dense_weights):
            return self.tensors(args, kwargs)

    def loss(self, args: tuple, kwargs: dict, targets: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Sum over measured tensors of the mean squared difference to D."""
        targets = targets if targets is not None else self.dense_tensors(args, kwargs)
        mine = self.tensors(args, kwargs)
        if len(mine) != len(targets):
            raise RuntimeError("S and D measured different numbers of tensors; their structure differs")
        return sum(((s - t.detach()) ** 2).mean() for s, t in zip(mine, targets))

    def gauss_newton(self, owner: nn.Module, name: str, args: tuple, kwargs: dict, share: float = 1.0
                     ) -> tuple[list[tuple[torch.Tensor, float]], Callable[[torch.Tensor], list]]:
        """What :class:`~prunekit.oneshot.solvers.newton_cg.GaussNewtonHVP` needs on one block input: the
        measured tensors with a graph, each weighted as in :meth:`loss` (``share`` / elements),
        and ``v -> [J_i v]`` by forward-mode AD with ``owner.<name>`` read as a dual tensor (one
        forward per product; ``torch.func.linearize`` was measured 25-50% faster per product but
        its tracing cost about 2 CPU s per Newton step, more than it saved at 20 CG iterations)."""
        outputs = [(t, share / max(t.numel(), 1)) for t in self.tensors(args, kwargs)]
        weight = owner._parameters[name]

        def jvp(v: torch.Tensor) -> list:
            with fwAD.dual_level(), torch.no_grad(), _reading(owner, name, fwAD.make_dual(weight.detach(), v)):
                return [fwAD.unpack_dual(t).tangent for t in self.tensors(args, kwargs)]
        return outputs, jvp

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _head(call: tuple[tuple, dict], fraction: float) -> tuple[tuple, dict]:
    """The first ``ceil(fraction * B)`` samples of a block call: every tensor argument whose
    first dimension is the batch size B of the first argument is cut along it."""
    args, kwargs = call
    batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 0
    n = max(1, math.ceil(fraction * batch))
    if batch <= 1 or n >= batch:
        return args, kwargs

    def cut(value):
        return value[:n] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch else value
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _reading(owner: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """Let ``owner.<name>`` return ``value`` (a dual tensor) instead of the parameter, with
    nn.MultiheadAttention's fused fast path (no forward-mode AD) off; both restored after."""
    saved, fast = owner._parameters[name], torch.backends.mha.get_fastpath_enabled()
    try:
        owner._parameters[name] = value
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        owner._parameters[name] = saved
        torch.backends.mha.set_fastpath_enabled(fast)


def _owner(model: nn.Module, layer: nn.Module, param: torch.Tensor) -> tuple[nn.Module, str]:
    """The module and attribute name that hold ``param`` (searched in ``layer`` first)."""
    for root in (layer, model):
        for module in root.modules():
            for name, p in module._parameters.items():
                if p is param:
                    return module, name
    raise ValueError("the parameter being refit is not held by the model")


@contextlib.contextmanager
def only_grad_for(model: nn.Module, param: nn.Parameter) -> Iterator[None]:
    """Let autograd track ``param`` alone (other parameters frozen, flags restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(p is param)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def snows_refit(
    model: nn.Module,
    chain: Sequence[tuple[str, nn.Module]],
    layer: nn.Module,
    mask: torch.Tensor,
    inputs: list[tuple[tuple, dict]],
    *,
    k: int,
    solver: NewtonCGConfig,
    targets: set[int],
    block_layers: dict[str, nn.Module],
    dense_weights: dict[str, torch.Tensor],
    measured_by: MeasuredRule = is_measured,
    progress: bool = False,
    param: nn.Parameter | None = None,
    frozen: torch.Tensor | None = None,
    ranks: Ranks | None = None,
    hvp: str = "exact",
) -> tuple[SolveStats, float, float]:
    """Refit ``param`` (default ``layer.weight``) on ``mask`` in place against the
    ``k``-operation lookahead loss, leaving its ``frozen`` entries as they are; returns (solver
    stats, check loss before, after). The last stored batch is held out for the line search
    (when there are several); with ``ranks``, one per rank. ``hvp``: ``"exact"`` (double
    backward) or ``"gauss_newton"`` (``J^T J v``: forward-mode JVP plus one backward)."""
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    with float32_working_copy([m for _, m in chain[:2]], dense_weights) as dense_weights:  # a half model
        return _refit(model, chain, layer, mask, inputs, k, solver, targets, block_layers, dense_weights,
                      measured_by, progress, param, frozen, ranks, hvp)


def _refit(model, chain, layer, mask, inputs, k, solver, targets, block_layers, dense_weights, measured_by,
           progress, param, frozen, ranks, hvp) -> tuple[SolveStats, float, float]:
    weight = layer.weight if param is None else param
    objective = Lookahead(chain, layer, k, targets, block_layers, dense_weights, measured_by)
    try:
        newton = list(range(len(inputs) - 1)) if len(inputs) > 1 else [0]
        check = len(inputs) - 1
        check_targets = objective.dense_tensors(*inputs[check])
        steps, shares = list(range(len(newton))), None
        if ranks is not None and ranks.active:
            steps, shares = _shares(ranks, [inputs[i] for i in newton], inputs[check])

        def loss_fn(i: int) -> torch.Tensor:
            if i >= len(newton):  # this rank has no batch for a step the others take
                return weight.sum() * 0.0
            at = check if i == -1 else newton[i]
            loss = objective.loss(*inputs[at], targets=check_targets if at == check else None)
            return loss if shares is None else loss * shares[i]

        hvp_loss_fn = gauss_newton = None
        if hvp == "gauss_newton":
            owner, name = _owner(model, layer, weight)

            def gauss_newton(i: int):
                if i >= len(newton):
                    return [], lambda v: []
                call = _head(inputs[newton[i]], solver.hessian_fraction)
                return objective.gauss_newton(owner, name, *call, share=1.0 if shares is None else shares[i])
        elif solver.hessian_fraction < 1.0:
            def hvp_loss_fn(i: int) -> torch.Tensor:
                if i >= len(newton):
                    return weight.sum() * 0.0
                loss = objective.loss(*_head(inputs[newton[i]], solver.hessian_fraction))
                return loss if shares is None else loss * shares[i]

        # The math attention kernel is built from differentiable ops, so it has the double
        # backward that Hessian-vector products need (the fused CPU/GPU kernels do not).
        with only_grad_for(model, weight), sdpa_kernel([SDPBackend.MATH]):
            stats = newton_cg_refit(weight, mask, loss_fn, steps, -1, solver, progress=progress, frozen=frozen,
                                    reduce=ranks.reduce if shares is not None else None, hvp_loss_fn=hvp_loss_fn,
                                    gauss_newton=gauss_newton)
        return stats, stats.check_loss_before, stats.check_loss_after
    finally:
        objective.close()


def _shares(ranks: Ranks, newton: list[tuple[tuple, dict]], check: tuple[tuple, dict]) -> tuple[list[int], list[float]]:
    """The global Newton steps (as many as the rank with the most batches has) and this rank's
    weight in each step's loss and in the check loss (last): its share of the elements of the
    block inputs, so the weighted sum of per-rank means is the mean over all ranks' batches."""
    steps = ranks.max(len(newton))
    sizes = [_elements(call) for call in newton] + [0.0] * (steps - len(newton)) + [_elements(check)]
    mine = torch.tensor(sizes, dtype=torch.float64, device=ranks.device)
    total = mine.clone()
    ranks.sum(total)
    return list(range(steps)), (mine / total.clamp_min(1.0)).tolist()


def _elements(call: tuple[tuple, dict]) -> float:
    first = first_input(call)
    return float(first.numel()) if isinstance(first, torch.Tensor) else 1.0
