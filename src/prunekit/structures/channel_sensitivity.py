"""Measured accuracy cost of each channel group's width (``prune_channels(sensitivity=...)``).

A global budget ranks channels by their score divided by their group's mean score: within a
group the score says which channels matter least, but across groups it only compares the shapes
of the score distributions, so a group the whole network depends on (a ResNet's 8-channel stem)
gives up as many channels as any other. :func:`measure_channel_sensitivity` measures instead what
cutting each group costs the network: for each group and a few kept widths, only that group is cut
(its channels chosen by ``score``), its consumers refit by least squares as ``prune_channels``
would, and the model's output on the calibration batches compared with the dense output (squared
error over the dense output's variance). Groups are assumed to add up, as the latency table's
milliseconds are (a layer-wise sensitivity analysis). With ``latency=`` too, the global ranking is
accuracy cost per millisecond saved, both measured.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..oneshot.calibration import collect_batches
from .channel_latency import _widths, interpolate
from .channel_refit import check_consumers, gone_columns, mask, repair
from .channel_scores import SCORES, channel_scores, check_obs, input_stats, lowest, obs_choose, obs_states
from .channels_graph import find_channel_groups
from .mha import swap_in_attentions
from .surgery import Undo

REFINES = (None, "lstsq")


@dataclass
class ChannelSensitivity:
    """``error[group][kept]``: the model's output error with only that group cut to ``kept``
    channels (0 at its full width, never less at a smaller width): squared error against the dense
    output over the dense output's variance, on the calibration batches."""

    error: dict[str, dict[int, float]] = field(default_factory=dict)
    score: str = "l2"
    refine: str | None = "lstsq"
    batches: int = 0

    def cost(self, group: str, kept: int) -> float:
        """Output error of ``group`` at ``kept`` channels, linear between measured widths."""
        return interpolate(self.error[group], kept)


def _output(y: Any) -> torch.Tensor:
    """The tensor a model's output is compared on: itself, the first of a tuple, ``logits`` or
    the first tensor of a mapping."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, Mapping):
        y = [y["logits"]] if "logits" in y else list(y.values())
    if isinstance(y, (tuple, list)):
        for v in y:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"measure_channel_sensitivity compares the model's output tensors; it returned {type(y).__name__}")


def _choose(model: nn.Module, group, count: int, score: str, stats: dict) -> list[int]:
    """The ``count`` channels of ``group`` that ``prune_channels`` would remove by ``score`` (``obs``:
    greedily, on fresh OBS states of the group's consumers)."""
    if score == "obs":
        states = obs_states(model, {m.module: stats[m.module] for m in group.consumers})
        return obs_choose(model, group, count, states)
    return lowest(channel_scores(model, group, score, stats), count)


def _error(model: nn.Module, calls, dense_out: list[torch.Tensor], variance: float) -> float:
    total = sum(float((_output(model(*a, **k)).double() - d).pow(2).sum()) for (a, k), d in zip(calls, dense_out))
    return total / variance


@torch.no_grad()
def measure_channel_sensitivity(model: nn.Module, calibration: Iterable[Any], *, score: str = "l2",
                                refine: str | None = "lstsq", points: int = 4, damp: float = 0.01,
                                max_batches: int | None = None, exclude: str | Iterable[str] | None = None,
                                passthrough: Iterable[str] | None = None) -> ChannelSensitivity:
    """The :class:`ChannelSensitivity` table of ``model`` on ``calibration`` (batches of inputs):
    each channel group cut alone to ``points`` widths, channels chosen by ``score`` (as in
    ``prune_channels``), consumers refit by least squares (``refine="lstsq"``, ridge ``damp``) or
    only masked (``refine=None``). ``exclude``/``passthrough`` as in ``prune_channels`` (the same
    groups must come out). The model is not changed."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be a whole number >= 2 (widths measured per group), got {points!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if refine not in REFINES:
        raise ValueError(f"refine must be 'lstsq' or None for a sensitivity table (SNOWS per width would take "
                         f"hours), got {refine!r}")
    calls = collect_batches(calibration, max_batches)
    if not calls:
        raise ValueError("calibration is empty; pass at least one batch of inputs")
    if calls[0][1]:
        raise TypeError("measure_channel_sensitivity traces the model with positional inputs; pass tensors or tuples")
    work = copy.deepcopy(model).eval()  # the user's model is never touched, even for a moment
    graph = find_channel_groups(work, calls[0][0], exclude, passthrough)
    swap_in_attentions(work, graph.attentions(), Undo())
    consumers = graph.consumers()
    if refine is not None or score in ("wanda", "obs"):
        check_consumers(work, consumers)
    if score == "obs":
        check_obs(work, consumers)
    stats = input_stats(work, consumers, calls, full=score == "obs") if score in ("wanda", "obs") else {}
    dense_out = [_output(work(*a, **k)).double() for a, k in calls]
    variance = sum(float((d - d.mean(0)).pow(2).sum()) for d in dense_out) or 1.0
    table = ChannelSensitivity({}, score, refine, len(calls))
    for g, grp in enumerate(graph.groups):
        error: dict[int, float] = {grp.count: 0.0}
        worst = 0.0
        for kept in _widths(grp.count, points)[1:]:
            undo = Undo()
            try:
                removed = {g: _choose(work, grp, grp.count - kept, score, stats)}
                if refine is None:
                    for name, cols in gone_columns(work, graph, removed).items():
                        mask(work, name, cols, undo)
                else:
                    repair(work, graph, removed, calls, damp, undo, {})
                worst = max(worst, _error(work, calls, dense_out, variance))  # narrower never costs less
            finally:
                undo.restore()
            error[kept] = worst
        table.error[grp.name] = error
    return table
