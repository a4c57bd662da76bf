"""``prunekit.prune_channels``: remove coupled CNN channels in one shot, repair, shrink.

1. trace the model with torch.fx and find its coupled channel groups (``channels_graph``);
2. score every channel of a group (``l2``: its filters' norm; ``bn``: its BatchNorm ``|gamma|``;
   ``wanda``: its consumers' columns' ``||W[:, j]||^2 E[x_j^2]`` on the dense network) and remove
   the lowest, a uniform ratio per group or the ratio that removes a fraction of the FLOPs;
3. ``refine="lstsq"``: with the removed input columns of every consumer zeroed, refit each
   consumer in execution order by exact least squares of its kept columns (a conv's columns are
   its im2col columns, ``in_channel x kh x kw``) to the dense network's output of that layer, on
   the inputs the already-repaired network feeds it;
4. physical surgery (``channel_surgery``), then BatchNorm re-estimation on the calibration batches.

Any failure, Ctrl-C included, puts the model back exactly as it was (an :class:`Undo` log).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..calls import eval_mode
from ..oneshot.batchnorm import recalibrate_batchnorm
from ..oneshot.calibration import collect_batches
from ..oneshot.solvers.columns import output_error, refit_columns
from .channel_budget import flops_counts, macs, ratio_counts
from .channel_surgery import removed_positions, shrink_channels
from .channels_graph import ChannelGraph, ChannelGroup, find_channel_groups
from .stats import ConsumerStats
from .surgery import Undo
from .units import StructureReport

SCORES = ("l2", "bn", "wanda")
REFINES = (None, "lstsq")


@dataclass
class ChannelResult:
    """What ``prune_channels`` did: one report per group, each refit consumer's output error
    (mean squared, summed over outputs) dropped vs refit, multiply-adds and parameters before and
    after, the BatchNorm batches used, and the wall time."""

    reports: list[StructureReport] = field(default_factory=list)
    refits: dict[str, tuple[float, float]] = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    bn_batches: int = 0
    seconds: float = 0.0

    @property
    def flops_removed(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def summary(self) -> str:
        lines = [f"{'channel group':40s} {'channels':>10s}"]
        lines += [f"{r.owner:40s} {f'{r.units_before}->{r.units_after}':>10s}" for r in self.reports]
        lines += [f"refit {name}: output error {d:.4g} dropped -> {e:.4g} refit" for name, (d, e) in self.refits.items()]
        lines.append(f"multiply-adds {self.macs_before:,} -> {self.macs_after:,} ({100 * self.flops_removed:.1f}% "
                     f"fewer); parameters {self.params_before:,} -> {self.params_after:,} in {self.seconds:.1f} s")
        return "\n".join(lines)


class _Stop(Exception):
    """Raised by a hook once the input it waits for has been seen: the rest of the forward is skipped."""


def layer_input(model: nn.Module, module: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    """The input ``module`` receives when ``model`` runs one batch (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(_m, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(*call[0], **call[1])
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("a consumer was not called by the model's forward")
    return seen[0]


def columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its matrix's columns: a conv's im2col rows
    (``F.unfold``: ``in_channel x kh x kw``, channel-major like ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Linear):
        return x
    u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def _span(module: nn.Module) -> int:
    return module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1


def _check(ratio, flops, score, refine, damp) -> None:
    if (ratio is None) == (flops is None):
        raise ValueError("give exactly one of ratio= (fraction of every group's channels) or flops= "
                         "(fraction of the multiply-adds to remove)")
    for name, value in (("ratio", ratio), ("flops", flops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if refine not in REFINES:
        raise ValueError(f"refine must be None or 'lstsq' for channels, got {refine!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")


def _scores(model: nn.Module, group: ChannelGroup, score: str, sq_means: dict[str, torch.Tensor]) -> torch.Tensor:
    modules = dict(model.named_modules())
    total = torch.zeros(group.count, dtype=torch.float64)
    for m in group.members:
        mod = modules[m.module]
        if score == "l2" and m.role == "out":
            rows = mod.weight.detach().double().reshape(mod.weight.shape[0], -1).pow(2).sum(1)
            total += rows[m.index].sum(1)
        elif score == "bn" and m.role == "bn":
            total += mod.weight.detach().double().abs()[m.index].sum(1)
        elif score == "wanda" and m.role == "in":
            span = _span(mod)
            cols = mod.weight.detach().double().reshape(mod.weight.shape[0], -1).pow(2).sum(0) * sq_means[m.module]
            total += cols.view(-1, span).sum(1)[m.index].sum(1) if span > 1 else cols[m.index].sum(1)
    return total


def _sq_means(model: nn.Module, consumers: list[str], calls) -> dict[str, torch.Tensor]:
    """``E[x_j^2]`` of every column of each consumer on the dense network (one pass)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []

    def hook(name):
        def f(m, args):
            u = columns(m, args[0].detach())
            sums[name] = sums.get(name, 0) + u.double().pow(2).sum(0)
            rows[name] = rows.get(name, 0) + u.shape[0]
        return f

    for name in consumers:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        for args, kwargs in calls:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / rows[n] for n in consumers}


def _lowest(values: torch.Tensor, count: int) -> list[int]:
    """The ``count`` channels of lowest score, ties towards the lower index."""
    order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    return sorted(order[:count])


def _check_consumers(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            raise ValueError(f"{name}: refine='lstsq' needs zero padding given as numbers (got padding="
                             f"{m.padding!r}, padding_mode={m.padding_mode!r}); use refine=None")


def _refit(model, dense, name: str, gone: set[int], calls, damp: float, undo: Undo) -> tuple[float, float]:
    """Refit one consumer's kept columns to the dense network's output of that layer."""
    m, t = dict(model.named_modules())[name], dict(dense.named_modules())[name]
    w = t.weight.detach().double().reshape(t.weight.shape[0], -1)
    span = _span(m)
    removed = torch.tensor(sorted(gone), dtype=torch.long)
    drop = (removed.unsqueeze(1) * span + torch.arange(span)).reshape(-1)
    keep = torch.tensor(sorted(set(range(w.shape[1])) - set(drop.tolist())), dtype=torch.long)
    stats = ConsumerStats(w.shape[1], dense=True)
    for call in calls:
        stats.add(columns(m, layer_input(model, m, call)).double(), columns(t, layer_input(dense, t, call)).double())
    b = None if t.bias is None else t.bias.detach().double()
    kw = dict(cross=stats.cross, mean_s=stats.mean_s, mean_t=stats.mean_t, bias=b)
    new_w, new_b = refit_columns(w, keep, stats.hessian, fit_bias=b is not None, damp=damp, **kw)
    if not torch.isfinite(new_w).all():
        raise ValueError(f"{name}: the refit produced non-finite weights; raise damp= or use refine=None")
    err_drop = output_error(w, keep, w[:, keep], stats.hessian, target_gram=stats.target_gram, new_bias=b, **kw)
    err_fit = output_error(w, keep, new_w, stats.hessian, target_gram=stats.target_gram, new_bias=new_b, **kw)
    full = torch.zeros_like(w)
    full[:, keep] = new_w
    undo.set(m, "weight", nn.Parameter(full.reshape(m.weight.shape).to(m.weight.dtype),
                                       requires_grad=m.weight.requires_grad))
    if b is not None:
        undo.set(m, "bias", nn.Parameter(new_b.to(m.bias.dtype), requires_grad=m.bias.requires_grad))
    return err_drop, err_fit


def _mask(model: nn.Module, name: str, gone: set[int], undo: Undo) -> None:
    """Zero a consumer's input columns of removed channels (the pruned network, before surgery)."""
    m = dict(model.named_modules())[name]
    w = m.weight.detach().reshape(m.weight.shape[0], -1).clone()
    w[:, sorted(gone)] = 0
    undo.set(m, "weight", nn.Parameter(w.reshape(m.weight.shape), requires_grad=m.weight.requires_grad))


def prune_channels(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    ratio: float | None = None,
    flops: float | None = None,
    score: str = "l2",
    refine: str | None = "lstsq",
    recalibrate_bn: bool = True,
    exclude: str | Iterable[str] | None = None,
    damp: float = 0.01,
    max_batches: int | None = None,
) -> ChannelResult:
    """Remove coupled channels from a CNN in place and repair it; returns a :class:`ChannelResult`.

    ``ratio`` removes that fraction of every channel group (rounded); ``flops`` instead
    removes at least that fraction of the convs' and Linears' multiply-adds with the smallest
    uniform ratio that does. ``score``: ``"l2"`` (filter norm), ``"bn"`` (BatchNorm ``|gamma|``)
    or ``"wanda"`` (activation-aware, from the consumers' inputs). ``refine="lstsq"`` refits every
    consumer to the dense network's output of that layer (a ridge ``damp`` towards the dense
    columns); ``recalibrate_bn`` re-estimates BatchNorm statistics on ``calibration`` afterwards.
    ``exclude``: a regex or module names traced as leaves whose channels stay (also the way past
    a module torch.fx cannot trace). The model's input and output channels never change.
    """
    _check(ratio, flops, score, refine, damp)
    calls = collect_batches(calibration, max_batches)
    if calls[0][1]:
        raise TypeError("prune_channels traces the model with positional inputs; pass tensors or tuples as batches")
    with eval_mode(model), torch.no_grad():  # tracing runs a forward: BatchNorm statistics must not move
        graph = find_channel_groups(model, calls[0][0], exclude)
    if not graph.groups:
        raise ValueError("the model has no channel group prunekit can remove (every channel reaches the input, "
                         "the output or an excluded module)")
    counts = ratio_counts(graph, ratio) if ratio is not None else flops_counts(graph, flops)
    for group, n in zip(graph.groups, counts):
        if n >= group.count:
            raise ValueError(f"{group.name}: removing {n} of its {group.count} channels leaves none; lower "
                             f"{'ratio' if ratio is not None else 'flops'}")
    if score == "bn":
        for group, n in zip(graph.groups, counts):
            if n and not any(m.role == "bn" for m in group.members):
                raise ValueError(f"{group.name}: score='bn' needs a BatchNorm on every group; this one has none")
    consumers = list(dict.fromkeys(m.module for g, n in zip(graph.groups, counts) if n for m in g.consumers))
    if refine == "lstsq":
        _check_consumers(model, consumers)
    result = ChannelResult(params_before=sum(p.numel() for p in model.parameters()), macs_before=macs(graph))
    undo, start, was_training = Undo(), time.perf_counter(), model.training
    try:
        model.eval()
        with torch.no_grad():
            sq = _sq_means(model, consumers, calls) if score == "wanda" else {}
            removed = {g: _lowest(_scores(model, group, score, sq), n)
                       for g, (group, n) in enumerate(zip(graph.groups, counts)) if n}
            if refine == "lstsq":
                _repair(model, graph, removed, calls, damp, undo, result)
            shrink_channels(model, graph, removed, undo)
            for g, group in enumerate(graph.groups):
                gone = removed.get(g, [])
                result.reports.append(StructureReport("channels", group.name, group.count, group.count - len(gone),
                                                      removed=gone))
            if recalibrate_bn:
                result.bn_batches = recalibrate_batchnorm(
                    model, [args[0] if len(args) == 1 else args for args, _ in calls])
    except BaseException:
        undo.restore()
        raise
    finally:
        model.train(was_training)
    result.macs_after = macs(graph, [len(removed.get(g, [])) for g in range(len(graph.groups))])
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    return result


def _repair(model, graph: ChannelGraph, removed, calls, damp, undo, result: ChannelResult) -> None:
    """Mask every consumer's removed inputs, then refit the consumers in execution order."""
    dense = copy.deepcopy(model)
    gone = {name: cols for (name, role), cols in removed_positions(graph, removed).items() if role == "in"}
    modules = dict(model.named_modules())
    for name, positions in gone.items():
        span = _span(modules[name])
        _mask(model, name, {p * span + k for p in positions for k in range(span)}, undo)
    for name in graph.layers:  # execution order
        if name in gone:
            result.refits[name] = _refit(model, dense, name, gone[name], calls, damp, undo)
