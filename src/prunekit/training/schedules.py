"""Schedules as pure functions of an explicit optimizer step (no hidden epoch counters).

Sparsity schedules map ``step -> sparsity`` for :class:`~prunekit.training.MagnitudePruner`:
:class:`Constant`, :class:`OneShot`, :func:`Cubic` (Zhu & Gupta GMP) and :class:`Cyclical`
(cubic ramps restarted every cycle, each ending exactly at the target). Any ``Callable[[int],
float]`` works too.

Threshold schedules map ``step -> fraction of the final threshold D`` for
:class:`~prunekit.training.SoftThreshold` (Chen et al. 2023, arXiv 2302.13019): S-LATS, per-epoch
LATS, PGH(beta), constant, linear, sine. Exact LATS depends on the learning rates actually used and
is computed by the pruner from :func:`exact_lats`. Every schedule gives 0 at the start of its
window and exactly 1 (i.e. D) at its end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..sparsity.allocation import check_sparsity

THRESHOLD_KINDS = ("s_lats", "lats", "exact_lats", "pgh", "constant", "linear", "sine")


def check_window(total_steps: int, start: int, name: str = "schedule") -> None:
    """Raise unless ``0 <= start < total_steps`` (both integers)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (total_steps, start)):
        raise TypeError(f"{name} steps must be integers, got total_steps={total_steps!r}, start={start!r}")
    if start < 0 or total_steps <= start:
        raise ValueError(f"{name} total_steps ({total_steps}) must be greater than its start ({start}) and start >= 0")


# --------------------------------------------------------------------------- sparsity schedules
@dataclass(frozen=True)
class Constant:
    """The same sparsity at every step (e.g. a fixed mask from step 0)."""

    final: float

    def __post_init__(self) -> None:
        check_sparsity(self.final, "final")

    def __call__(self, step: int) -> float:
        return self.final


@dataclass(frozen=True)
class OneShot:
    """Dense before ``at``, ``final`` from step ``at`` on: one-shot pruning, then fine-tuning."""

    final: float
    at: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.final, "final")
        if not isinstance(self.at, int) or self.at < 0:
            raise ValueError(f"OneShot.at must be a step >= 0, got {self.at!r}")

    def __call__(self, step: int) -> float:
        return self.final if step >= self.at else 0.0


def update_interval(every: int | None, span: int, where: str, cycles: int = 1) -> int:
    """Steps between mask updates in a ramp of ``span`` steps: ``every`` if it leaves room for at least
    two updates, else a ValueError naming ``where``. ``None`` picks about 20 updates per ramp, never
    more than 50 steps apart (50 is the Cyclical Pruning authors' GMP interval; Zhu & Gupta 2017 found
    100-1000 steps on long runs all fine), so short runs work without tuning."""
    if span < 2:
        raise ValueError(f"{where} has {span} step{'' if span == 1 else 's'}, too short: a ramp needs two mask "
                         f"updates at least; lengthen the pruning window{' or use fewer cycles' if cycles > 1 else ''}")
    if every is None:
        return max(1, min(50, span // 20))
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{where}: every (steps between mask updates) must be an integer >= 1, got {every!r}")
    if span <= every:
        raise ValueError(f"{where} has {span} steps, too short for every={every} (a ramp needs two mask updates); "
                         f"pass every={span - 1} or less, or leave every=None to fit the run")
    return every


@dataclass(frozen=True)
class Cyclical:
    """Cyclical pruning (Srinivas et al. 2022, arXiv 2202.01290): ``cycles`` cubic ramps in ``[start, end)``.

    Cycle ``c`` covers ``[b_c, b_{c+1})`` with ``b_c = start + c*(end-start)//cycles``. On its grid
    ``b_c + j*every`` the sparsity is ``final + (initial_c - final)*(1 - j/n_c)**3``, where ``n_c`` is
    the last grid index inside the cycle, so each cycle restarts at ``initial_c`` (a drop that
    re-opens the mask) and its last update lands exactly on ``final``. Dense before ``start``,
    ``final`` from ``end`` on. ``cycles=1`` is GMP (:func:`Cubic`). Defaults: window [0.1T, 0.7T];
    ``every=None``: about 20 updates per cycle, at most every 50 steps (see :func:`update_interval`).
    """

    final: float
    total_steps: int
    cycles: int = 3
    start: int | None = None
    end: int | None = None
    every: int | None = None
    initial: float | tuple[float, ...] = 0.0
    shape: str = "cubic"
    _name: str = field(default="Cyclical", repr=False, compare=False)  # "Cubic" when made by Cubic()

    def __post_init__(self) -> None:
        check_sparsity(self.final, "final")
        start = round(0.1 * self.total_steps) if self.start is None else self.start
        end = round(0.7 * self.total_steps) if self.end is None else self.end
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        check_window(self.total_steps, start)
        check_window(end, start, "pruning window: end")
        if end > self.total_steps:
            raise ValueError(f"pruning window end ({end}) is after total_steps ({self.total_steps})")
        if not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1, got {self.cycles!r}")
        if self.shape not in ("cubic", "linear"):
            raise ValueError(f"shape must be 'cubic' or 'linear', got {self.shape!r}")
        initial = self.initial if isinstance(self.initial, (tuple, list)) else (self.initial,) * self.cycles
        if len(initial) != self.cycles:
            raise ValueError(f"initial needs one sparsity per cycle ({self.cycles}), got {len(initial)}")
        for s in initial:
            check_sparsity(s, "initial")
            if s > self.final:
                raise ValueError(f"initial sparsity {s} exceeds final {self.final}")
        object.__setattr__(self, "initial", tuple(float(s) for s in initial))
        span = min(self.bounds(c + 1) - self.bounds(c) for c in range(self.cycles))
        where = (f"{self._name}(total_steps={self.total_steps}): the ramp [{start}, {end})" if self.cycles == 1 else
                 f"{self._name}(total_steps={self.total_steps}, cycles={self.cycles}): each cycle")
        object.__setattr__(self, "every", update_interval(self.every, span, where, self.cycles))

    def bounds(self, c: int) -> int:
        """First step of cycle ``c`` (``c = cycles`` gives the window end)."""
        return self.start + c * (self.end - self.start) // self.cycles

    def __call__(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if step >= self.end:
            return self.final
        c = max(c for c in range(self.cycles) if self.bounds(c) <= step)
        b, n = self.bounds(c), (self.bounds(c + 1) - self.bounds(c) - 1) // self.every
        tau = min((step - b) // self.every / n, 1.0)
        ramp = (1.0 - tau) ** 3 if self.shape == "cubic" else 1.0 - tau
        return self.final + (self.initial[c] - self.final) * ramp


def Cubic(final: float, total_steps: int, start: int = 0, end: int | None = None, every: int | None = None,
          initial: float = 0.0) -> Cyclical:
    """Gradual magnitude pruning (Zhu & Gupta 2017, arXiv 1710.01878, eq. 1): one cubic ramp over
    ``[start, end)`` (default: the whole run), updated every ``every`` steps (default: about 20 updates,
    at most every 50 steps), landing exactly on ``final``."""
    return Cyclical(final, total_steps, cycles=1, start=start, end=total_steps if end is None else end,
                    every=every, initial=initial, _name="Cubic")


# -------------------------------------------------------------------------- threshold schedules
def s_lats(x: float) -> float:
    """S-LATS fraction of D at window progress ``x``: ``x + sin(pi x)/pi``."""
    return x + math.sin(math.pi * x) / math.pi


def lats_epoch(e: int, b: int, epochs: int, batches: int) -> float:
    """Per-epoch LATS fraction at batch ``b`` of epoch ``e`` (of ``epochs`` x ``batches``)."""
    if e >= epochs:
        return 1.0
    E = epochs
    base = 0.5 * (1 + 2 * e + math.sin(math.pi * (e - 0.5) / E) / math.sin(math.pi / (2 * E))) / (E + 1)
    return base + b * (1 + math.cos(math.pi * e / E)) / (batches * (E + 1))


def pgh(x: float, beta: float) -> float:
    """PGH(beta) fraction: ``F(x)/F(1)`` with ``F(x) = int_0^x beta^u (1 + cos pi u) du``.
    beta < 1 front-loads the threshold (early pruning); beta -> 1 is S-LATS."""
    if not beta > 0:
        raise ValueError(f"PGH needs beta > 0, got {beta!r}")
    a = math.log(beta)
    if abs(a) < 1e-6:
        return s_lats(x)

    def F(t: float) -> float:
        bt = beta ** t
        return (bt - 1) / a + (bt * (a * math.cos(math.pi * t) + math.pi * math.sin(math.pi * t)) - a) / (a * a + math.pi ** 2)

    return F(x) / F(1.0)


def linear(x: float) -> float:
    """Linear threshold ramp (not adapted to the learning rate)."""
    return x


def sine(x: float) -> float:
    """Sine threshold ramp ``(1 - cos pi x)/2`` (STDS; not adapted to the learning rate)."""
    return (1 - math.cos(math.pi * x)) / 2


def exact_lats(lr_sum: float, lr_total: float) -> float:
    """Exact LATS fraction: learning rates used so far over the total, capped at 1."""
    return min(lr_sum / lr_total, 1.0) if lr_total > 0 else 1.0


@dataclass(frozen=True)
class ThresholdSchedule:
    """Fraction of the final threshold D at an optimizer step, for one named schedule.

    The window is ``[start, total_steps)``: 0 up to ``start`` (dense), exactly 1 from
    ``total_steps`` on; ``constant`` is 1 from step 0. ``lats`` needs ``steps_per_epoch`` (epochs
    counted from ``start``); ``pgh`` needs ``beta > 0``. ``exact_lats`` is not a function of the step
    alone: the pruner uses :func:`exact_lats` with the learning rates it saw.
    """

    kind: str
    total_steps: int
    start: int = 0
    beta: float | None = None
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in THRESHOLD_KINDS:
            raise ValueError(f"threshold schedule must be one of {THRESHOLD_KINDS}, got {self.kind!r}")
        check_window(self.total_steps, self.start)
        if self.kind == "pgh" and (self.beta is None or not self.beta > 0):
            raise ValueError(f"schedule 'pgh' needs beta > 0 (beta < 1 prunes early), got beta={self.beta!r}")
        if self.kind == "lats":
            n = self.steps_per_epoch
            if not isinstance(n, int) or n < 1 or (self.total_steps - self.start) % n:
                raise ValueError(f"schedule 'lats' needs steps_per_epoch dividing the window of "
                                 f"{self.total_steps - self.start} steps, got {n!r}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "exact_lats":
            raise TypeError("exact_lats depends on the learning rates used; use schedules.exact_lats(lr_sum, lr_total)")
        span = self.total_steps - self.start
        s = min(max(step - self.start, 0), span)
        if s == span:
            return 1.0
        x = s / span
        if self.kind == "lats":
            n = self.steps_per_epoch
            return lats_epoch(s // n, s % n, span // n, n)
        if self.kind == "pgh":
            return pgh(x, self.beta)
        return {"s_lats": s_lats, "linear": linear, "sine": sine}[self.kind](x)
