"""Measured CPU time each channel group's width costs (``prune_channels(latency=...)``).

FLOPs are a poor guide to speed for narrow layers: a 3x3 conv cut from 32 to 22 channels at 7x7
keeps 47% of its multiply-adds and nearly all of its time (``benchmarks/vision_speed_why.py``).
:func:`measure_channel_latency` times the model once per group and width: a copy with only that
group narrowed, alternated with the dense model on one input batch (medians). The table gives the
milliseconds each group saves at each kept width, assuming groups add up (HALP's lookup-table
view). ``prune_channels(..., budget="global", latency=table)`` then ranks channels by accuracy cost
per millisecond saved instead of per channel. Timings depend on the machine, its load, the batch
and the threads: measure where the model will run, and keep the table to make the choice
repeatable.
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..calls import eval_mode, forward_latency
from .channel_surgery import shrink_channels
from .channel_types import ChannelGraph
from .channels_graph import find_channel_groups
from .mha import swap_in_attentions
from .surgery import Undo


def interpolate(table: dict[int, float], kept: int) -> float:
    """``table[kept]``, linear between the measured widths around ``kept`` (the end values beyond)."""
    widths = sorted(table)
    if kept >= widths[-1]:
        return table[widths[-1]]
    if kept <= widths[0]:
        return table[widths[0]]
    hi = next(w for w in widths if w >= kept)
    lo = max(w for w in widths if w <= kept)
    if hi == lo:
        return table[lo]
    return table[lo] + (table[hi] - table[lo]) * (kept - lo) / (hi - lo)


@dataclass
class ChannelLatency:
    """``saved_ms[group][kept]``: milliseconds one forward of the measured batch saves with only
    that group narrowed to ``kept`` channels (0 at its full width, never less at a smaller width);
    ``dense_ms``: the dense forward; how it was measured in the other fields."""

    dense_ms: float
    saved_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    batch: int = 0
    threads: int = 1
    repeats: int = 0

    def saved(self, group: str, kept: int) -> float:
        """Milliseconds saved by ``group`` at ``kept`` channels, linear between measured widths."""
        return interpolate(self.saved_ms[group], kept)

    def predicted_speedup(self, kept: dict[str, int]) -> float:
        """Dense time over the dense time less every group's saving at its ``kept`` width (groups
        not named keep all; groups assumed to add up): what the table expects the pruned model to
        gain; measure the pruned model to know."""
        left = self.dense_ms - sum(self.saved(group, k) for group, k in kept.items())
        return self.dense_ms / left if left > 0 else math.inf


def _widths(count: int, points: int) -> list[int]:
    """``points`` kept widths from ``count`` down to 1 (distinct, descending), ``count`` first."""
    return sorted({max(1, round(count * (points - i) / points)) for i in range(points)} | {count, 1}, reverse=True)


def _forward_ms(model: nn.Module, dense: nn.Module, x: tuple, repeats: int) -> tuple[float, float]:
    """Median ms of ``dense(*x)`` and ``model(*x)``, taking turns (:func:`prunekit.calls.forward_latency`)."""
    times = forward_latency({"dense": dense, "pruned": model}, x, repeats=repeats)
    return statistics.median(times["dense"]), statistics.median(times["pruned"])


def narrowed(model: nn.Module, graph: ChannelGraph, group: int, kept: int) -> nn.Module:
    """A copy of ``model`` with only group number ``group`` cut to ``kept`` channels (its last ones
    go: the time depends on the shapes only)."""
    out = copy.deepcopy(model)
    grp = graph.groups[group]
    undo = Undo()
    swap_in_attentions(out, graph.attentions([grp]), undo)
    shrink_channels(out, graph, {group: list(range(kept, grp.count))}, undo)
    return out


@torch.no_grad()
def measure_channel_latency(model: nn.Module, example: Any, *, points: int = 4, repeats: int = 20,
                            threads: int | None = None, exclude: str | Iterable[str] | None = None,
                            passthrough: Iterable[str] | None = None) -> ChannelLatency:
    """Time ``model`` on ``example`` (a tensor or tuple of positional inputs: the batch the model
    will run) with each channel group narrowed to ``points`` widths, one group at a time; returns
    the :class:`ChannelLatency` table for ``prune_channels(latency=...)``. ``exclude`` and
    ``passthrough`` as in ``prune_channels`` (the same groups must come out). ``threads``: intra-op
    threads while timing (default: as they are). The model is not changed."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be a whole number >= 2 (widths timed per group), got {points!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats!r}")
    x = example if isinstance(example, tuple) else (example,)
    before = torch.get_num_threads()
    with eval_mode(model):
        graph = find_channel_groups(model, x, exclude, passthrough)
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            dense_ms = statistics.median(forward_latency({"dense": model}, x, repeats=repeats)["dense"])
            table = ChannelLatency(dense_ms, {}, int(x[0].shape[0]), torch.get_num_threads(), repeats)
            for g, grp in enumerate(graph.groups):
                saved: dict[int, float] = {grp.count: 0.0}
                best = 0.0
                for kept in _widths(grp.count, points)[1:]:
                    d_ms, p_ms = _forward_ms(narrowed(model, graph, g, kept).eval(), model, x, repeats)
                    best = max(best, d_ms - p_ms)  # a narrower group never costs more time than a wider one
                    saved[kept] = best
                table.saved_ms[grp.name] = saved
        finally:
            torch.set_num_threads(before)
    return table
