"""``prunekit.prune_channels``: remove coupled CNN channels in one shot, repair, shrink.

1. trace the model with torch.fx and find its coupled channel groups (``channels_graph``);
2. count how many channels each group loses (``channel_budget``: a uniform ratio, the smallest
   uniform ratio reaching a FLOPs or parameter fraction, or a global budget over all groups);
3. choose them by a score (``channel_scores``: l2, bn, wanda, obs);
4. ``refine``: refit every consumer by least squares, then optionally by SNOWS's lookahead
   (``channel_refit``);
5. physical surgery (``channel_surgery``), then BatchNorm re-estimation on the calibration batches.

Any failure, Ctrl-C included, puts the model back exactly as it was (an :class:`Undo` log).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..calls import eval_mode
from ..oneshot.batchnorm import recalibrate_batchnorm
from ..oneshot.calibration import collect_batches
from ..oneshot.registry import make_options
from ..oneshot.snows_options import SnowsOptions
from .budget import GLOBAL_FLOOR
from .channel_budget import BUDGETS, global_counts, macs, ratio_counts, uniform_counts
from .channel_latency import ChannelLatency
from .channel_sensitivity import ChannelSensitivity
from .channel_refit import check_consumers, gone_columns, repair
from .channel_scores import SCORES, channel_scores, check_obs, input_stats, lowest, obs_choose, obs_states
from .channel_surgery import shrink_channels
from .channels_graph import find_channel_groups
from .mha import swap_in_attentions
from .surgery import Undo
from .units import StructureReport

REFINES = (None, "lstsq", "snows")


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
    predicted_speedup: float | None = None
    measured_speedup: float | None = None

    @property
    def flops_removed(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def summary(self) -> str:
        lines = [f"{'channel group':40s} {'channels':>10s}"]
        lines += [f"{r.owner:40s} {f'{r.units_before}->{r.units_after}':>10s}" for r in self.reports]
        lines += [f"refit {name}: output error {d:.4g} dropped -> {e:.4g} refit" for name, (d, e) in self.refits.items()]
        lines.append(f"multiply-adds {self.macs_before:,} -> {self.macs_after:,} ({100 * self.flops_removed:.1f}% "
                     f"fewer); parameters {self.params_before:,} -> {self.params_after:,} in {self.seconds:.1f} s")
        if self.predicted_speedup is not None:
            lines.append(f"the latency table predicts x{self.predicted_speedup:.2f} dense speed (measure it to know)")
        if self.measured_speedup is not None:
            lines.append(f"measured: x{self.measured_speedup:.2f} dense speed")
        return "\n".join(lines)


class _Snows:  # what make_options reads: the name in its messages and the options class
    name, Options = "snows", SnowsOptions


def _fraction(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


def check_speedup_number(speedup: Any, meaning: str) -> None:
    """ValueError unless ``speedup`` is a finite number > 1 (``meaning``: what it asks for)."""
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 1 < speedup < float("inf"):
        raise ValueError(f"speedup must be a number > 1 ({meaning}), got {speedup!r}")


def _check_speedup(speedup: Any, latency: ChannelLatency | None) -> None:
    if speedup is None:
        return
    check_speedup_number(speedup, "how many times faster than dense the latency table must predict the pruned model")
    if latency is None:
        raise ValueError("speedup= is predicted from a measured latency table: pass latency=pk.measure_channel_latency("
                         "model, batch) and budget='global' with it")


def _check(targets: dict[str, Any], score, refine, damp, budget, floor, refine_options,
           speedup: Any = None) -> SnowsOptions | None:
    given = [k for k, v in targets.items() if v is not None]
    if len(given) > 1 or (not given and speedup is None):
        raise ValueError("give exactly one of ratio= (fraction of every group's channels), flops= (fraction of the "
                         f"multiply-adds to remove) or params= (fraction of the parameters); got {given or 'none'}"
                         + ("" if given else " (or speedup= with a latency= table)"))
    for name, value in targets.items():
        _fraction(name, value)
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if refine not in REFINES:
        raise ValueError(f"refine must be None, 'lstsq' or 'snows' for channels, got {refine!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if floor is not None and budget != "global":
        raise ValueError("floor= (the least share of each group's channels kept) applies to budget='global'")
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1):
        raise ValueError(f"floor must be a number in [0, 1), got {floor!r}")
    if refine_options is not None and refine != "snows":
        raise ValueError(f"refine_options are SNOWS's options; pass refine='snows' with them (refine={refine!r})")
    return make_options(_Snows, refine_options) if refine == "snows" else None


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
    params: float | None = None,
    budget: str = "uniform",
    floor: float | None = None,
    refine_options: SnowsOptions | dict | None = None,
    passthrough: Iterable[str] | None = None,
    multiple_of: int = 1,
    latency: ChannelLatency | None = None,
    speedup: float | None = None,
    sensitivity: ChannelSensitivity | None = None,
) -> ChannelResult:
    """Remove coupled channels from a CNN in place and repair it; returns a :class:`ChannelResult`.

    ``ratio`` removes that fraction of every channel group (rounded); ``flops`` / ``params``
    instead remove at least that fraction of the convs' and Linears' multiply-adds / parameters
    with the smallest uniform ratio that does. ``budget="global"`` ranks every group's channels
    together by score divided by the group's mean score and gives each group its own count,
    keeping at least ``floor`` (default 0.25) of its channels. ``score``: ``"l2"`` (filter norm),
    ``"bn"`` (BatchNorm ``|gamma|``), ``"wanda"`` (activation-aware, from the consumers' inputs)
    or ``"obs"`` (greedy second-order removal, costs summed over the group's consumers).
    ``refine="lstsq"`` refits every consumer to the dense network's output of that layer (a ridge
    ``damp`` towards the dense columns); ``"snows"`` then refits it against SNOWS's K-step
    lookahead (``refine_options``: :class:`~prunekit.oneshot.snows_options.SnowsOptions` or a dict);
    ``refine=None`` keeps the weights (for ``obs``: the OBS-updated consumers). ``recalibrate_bn``
    re-estimates BatchNorm statistics on ``calibration`` afterwards. ``exclude``: a regex or
    module names traced as leaves whose channels stay (also the way past a module torch.fx cannot
    trace). ``passthrough``: names of modules you declare map channel c to channel c and hold no
    parameters (a custom activation torch.fx cannot trace): traced as leaves, their channels can
    still go. ``multiple_of``: every group keeps a multiple of this many channels (the nearest; a
    group of ``multiple_of`` or fewer keeps all; heads groups as they are), since odd channel
    counts run slower in vectorised conv kernels. ``latency``: a table from
    :func:`~prunekit.structures.channel_latency.measure_channel_latency` on this model; with
    ``budget="global"`` and ``flops=``/``params=``, channels are ranked by accuracy cost per
    millisecond saved on the measured machine and batch. ``speedup`` (with ``latency`` and
    ``budget="global"``): remove channels in that order until the table predicts the model runs
    this many times faster than dense, then, if ``flops=``/``params=`` is also given and not yet
    reached, by score alone until it is; alone it is the target. ``sensitivity``: a table from
    :func:`~prunekit.structures.channel_sensitivity.measure_channel_sensitivity` on this model; with
    ``budget="global"``, groups give up channels by the output error each cut was measured to cost
    (per channel, or per millisecond with ``latency``), not by normalised score; within a group
    ``score`` still chooses. The model's input and output channels never change.
    """
    snows = _check({"ratio": ratio, "flops": flops, "params": params}, score, refine, damp, budget, floor,
                   refine_options, speedup)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a whole number >= 1 (the channels each group keeps are a multiple "
                         f"of it), got {multiple_of!r}")
    for name, table, kind, call in (("latency", latency, ChannelLatency, "measure_channel_latency(model, batch)"),
                                    ("sensitivity", sensitivity, ChannelSensitivity,
                                     "measure_channel_sensitivity(model, calibration)")):
        if table is not None and not isinstance(table, kind):
            raise TypeError(f"{name} must be a table from pk.{call}, got {type(table).__name__}")
        if table is not None and (budget != "global" or ratio is not None):
            raise ValueError(f"{name}= ranks channels across groups: use it with budget='global' and flops=, params= "
                             "or speedup=")
    _check_speedup(speedup, latency)
    floor = GLOBAL_FLOOR if floor is None else floor
    target = "ratio" if ratio is not None else "flops" if flops is not None else "params" if params is not None else None
    fraction = ratio if ratio is not None else flops if flops is not None else params
    calls = collect_batches(calibration, max_batches)
    if calls[0][1]:
        raise TypeError("prune_channels traces the model with positional inputs; pass tensors or tuples as batches")
    with eval_mode(model), torch.no_grad():  # tracing runs a forward: BatchNorm statistics must not move
        graph = find_channel_groups(model, calls[0][0], exclude, passthrough)
    for name, table in (("latency", latency and latency.saved_ms), ("sensitivity", sensitivity and sensitivity.error)):
        if table is not None and set(table) != {g.name for g in graph.groups}:
            raise ValueError(f"{name}: the table's channel groups are not this model's (measure it on this model, "
                             "with the same exclude= and passthrough=)")
    if not graph.groups:
        raise ValueError("the model has no channel group prunekit can remove (every channel reaches the input, "
                         "the output or an excluded module)")
    if score == "bn":
        for group in graph.groups:
            if not any(m.role == "bn" for m in group.members):
                raise ValueError(f"{group.name}: score='bn' needs a BatchNorm on every group; this one has none")
    consumers = graph.consumers()
    if refine is not None or score in ("wanda", "obs"):  # both read the consumers' im2col columns
        check_consumers(model, consumers)
    if score == "obs":
        check_obs(model, consumers)
    result = ChannelResult(params_before=sum(p.numel() for p in model.parameters()), macs_before=macs(graph))
    undo, start, was_training = Undo(), time.perf_counter(), model.training
    try:
        model.eval()
        swap_in_attentions(model, graph.attentions(), undo)  # -> the drop-in that can hold fewer heads
        with torch.no_grad():
            stats = input_stats(model, consumers, calls, full=score == "obs") if score in ("wanda", "obs") else {}
            if score == "obs":
                stats = obs_states(model, stats)
            if budget == "global":
                scores = [channel_scores(model, group, score, stats) for group in graph.groups]
                counts = global_counts(graph, scores, target, fraction, floor, multiple_of, latency, speedup,
                                       sensitivity)
            else:
                counts = (ratio_counts(graph, ratio, multiple_of) if ratio is not None else
                          uniform_counts(graph, target, fraction, multiple_of))
            for group, n in zip(graph.groups, counts):
                if n >= group.count:
                    raise ValueError(f"{group.name}: removing {n} of its {group.count} channels leaves none; lower "
                                     f"{target or 'speedup'}")
            removed = {g: (obs_choose(model, group, n, stats) if score == "obs" else
                           lowest(channel_scores(model, group, score, stats), n))
                       for g, (group, n) in enumerate(zip(graph.groups, counts)) if n}
            if refine is not None:
                repair(model, graph, removed, calls, damp, undo, result.refits, snows)
            elif score == "obs":
                _write_obs(model, gone_columns(model, graph, removed), stats, undo)
            shrink_channels(model, graph, removed, undo)
            for g, group in enumerate(graph.groups):
                gone = removed.get(g, [])
                kind = "heads" if any(m.role == "heads" for m in group.members) else "channels"
                result.reports.append(StructureReport(kind, group.name, group.count, group.count - len(gone),
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
    if latency is not None:
        result.predicted_speedup = latency.predicted_speedup({r.owner: r.units_after for r in result.reports})
    result.seconds = time.perf_counter() - start
    return result


def _write_obs(model: nn.Module, gone: dict[str, set[int]], states, undo: Undo) -> None:
    """``refine=None`` with ``score="obs"``: every consumer that lost columns takes its OBS-updated matrix."""
    modules = dict(model.named_modules())
    for name in gone:
        m = modules[name]
        undo.set(m, "weight", nn.Parameter(states[name].w.reshape(m.weight.shape).to(m.weight.dtype),
                                           requires_grad=m.weight.requires_grad))
