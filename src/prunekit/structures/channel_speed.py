"""``prune_channels_to_speedup``: remove channels until the pruned model is *measured* faster.

``prune_channels(speedup=s, latency=table)`` stops when the latency table predicts ``s``; the table
assumes that groups add up, and on the MNIST models here it overstates the gain (predicted x1.56,
measured x1.45 on the ResNet). This wraps it in the obvious loop: prune a copy, time it against the
dense model on the batch it will run, and if it falls short, ask the table for more by the
shortfall (the next goal is the copy's predicted speed-up times ``s / measured``) and prune a
fresh copy; when a copy measures more than ``s``, the same correction lowers the goal, so that
fewer channels go. The model itself is pruned once, with the lowest goal that measured ``s``.
"""
from __future__ import annotations

import copy
import math
import statistics
from typing import Any, Iterable

import torch
from torch import nn

from ..calls import forward_latency
from .channel_latency import ChannelLatency, measure_channel_latency
from .channels import ChannelResult, check_speedup_number, prune_channels

#: prune_channels keywords this function sets itself
_OWN = ("budget", "speedup", "latency")


def _measured(dense: nn.Module, pruned: nn.Module, example: tuple, repeats: int, threads: int | None) -> float:
    """Median dense ms over median pruned ms, the two taking turns on ``example``."""
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        times = forward_latency({"dense": dense, "pruned": pruned}, example, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times["dense"]) / statistics.median(times["pruned"])


def _next_goal(corrected: float, short: float | None, met: float | None) -> float:
    """The table's next goal: its prediction corrected by the last measurement (``corrected``),
    kept strictly between the highest goal that fell short and the lowest that measured enough
    (their midpoint when the correction lands outside), and above 1."""
    lo, hi = short or 1.0, met or math.inf
    goal = corrected if lo < corrected < hi else (lo + hi) / 2 if hi < math.inf else lo * 1.01
    return max(goal, 1.0 + 1e-6)


def prune_channels_to_speedup(model: nn.Module, calibration: Iterable[Any], example: Any, *, speedup: float,
                              tries: int = 3, repeats: int = 20, threads: int | None = None,
                              latency: ChannelLatency | None = None, **options: Any) -> ChannelResult:
    """Prune ``model`` in place (``prune_channels(..., budget="global", latency=table,
    speedup=goal, **options)``) so that it runs at least ``speedup`` times faster than before on
    ``example`` (a tensor or tuple of inputs: the batch it will run), as measured here, alternated
    with the dense model (``repeats`` each, ``threads`` intra-op threads). ``latency``: a table of
    this model (default: measured on ``example``). At most ``tries`` prunes of copies (it stops
    sooner when the next goal is within 1% of one tried); the lowest goal that measured
    ``speedup`` prunes the model; none is a ValueError and the model is left as it was. ``options``: any other
    ``prune_channels`` keyword (``flops=``/``params=`` floors, ``score``, ``sensitivity``, ...).
    The result's ``measured_speedup`` is the kept copy's measurement."""
    check_speedup_number(speedup, "how many times faster than dense, measured")
    for name, value in (("tries", tries), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    own = [k for k in _OWN if k in options]
    if own:
        raise TypeError(f"prune_channels_to_speedup sets {', '.join(own)} itself (budget='global', the speedup goal, "
                        "latency= is its own keyword); remove it")
    x = example if isinstance(example, tuple) else (example,)
    if latency is None:
        latency = measure_channel_latency(model, x, threads=threads, exclude=options.get("exclude"),
                                          passthrough=options.get("passthrough"))
    goal, seen, tried = float(speedup), [], []
    met: tuple[float, float] | None = None  # (goal, measured) of the lowest goal that measured speedup
    short: float | None = None  # the highest goal that fell short
    for _ in range(tries):
        trial = copy.deepcopy(model)
        try:
            predicted = prune_channels(trial, calibration, budget="global", latency=latency, speedup=goal,
                                       **options).predicted_speedup
        except ValueError as e:
            if met is not None:
                break
            if not seen:
                raise
            raise ValueError(f"speedup={speedup:g}: measured {', '.join(f'x{m:.2f}' for m in seen)}; asking the latency "
                             f"table for x{goal:.2f} to make up for it is beyond what it allows ({e}); lower speedup= "
                             f"or floor=") from None
        measured = _measured(model, trial, x, repeats, threads)
        seen.append(measured)
        tried.append(goal)
        if measured >= speedup:
            met = (goal, measured) if met is None or goal < met[0] else met
        else:
            short = goal if short is None else max(short, goal)
        goal = _next_goal(predicted * speedup / measured, short, None if met is None else met[0])
        if any(abs(goal - g) <= 0.01 * g for g in tried):  # nothing new to learn from the table
            break
    if met is not None:
        result = prune_channels(model, calibration, budget="global", latency=latency, speedup=met[0], **options)
        result.measured_speedup = met[1]
        return result
    raise ValueError(f"speedup={speedup:g} was not measured in {tries} {'try' if tries == 1 else 'tries'} (measured "
                     f"{', '.join(f'x{m:.2f}' for m in seen)}); the model is unchanged; lower speedup=, raise tries=, "
                     "or measure on a quieter machine")
