"""Measured forward latency of a model, and of a baseline beside it, with their sizes.

Speed is measured, never inferred from FLOPs: every model runs its forward on the same example
inputs ``warmup`` times (not counted), then ``repeats`` times, the models taking turns (so a
change in the machine's load falls on each alike), in this process with its threads; the median
is reported. Parameters and FLOPs are :func:`prunekit.model_report`'s, per forward of the same inputs.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .calls import forward_latency
from .report import human_count, human_flops, model_report


@dataclass
class ModelSpeed:
    """One model: parameters, prunable-layer FLOPs per forward (dense kernels, and counting only
    non-zero weights) and the measured forward latency in milliseconds (median and every repeat)."""

    name: str
    params: int
    nonzeros: int
    flops: int
    flops_nonzero: int
    median_ms: float
    times_ms: list[float] = field(default_factory=list)


@dataclass
class SpeedReport:
    """The model's row, the baseline's (or None), and how they were measured."""

    model: ModelSpeed
    baseline: ModelSpeed | None
    threads: int
    repeats: int
    warmup: int

    def ratios(self) -> dict[str, float]:
        """Parameters and FLOPs as a fraction of the baseline's, and ``speedup``: the baseline's
        latency over the model's (> 1: the model is faster). Empty without a baseline."""
        m, b = self.model, self.baseline
        if b is None:
            return {}
        frac = lambda x, y: x / y if y else float("nan")  # noqa: E731
        return {"params": frac(m.params, b.params), "nonzeros": frac(m.nonzeros, b.nonzeros),
                "flops": frac(m.flops, b.flops), "flops_nonzero": frac(m.flops_nonzero, b.flops_nonzero),
                "speedup": frac(b.median_ms, m.median_ms)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "baseline": asdict(self.baseline) if self.baseline else None,
                "ratios": self.ratios(), "threads": self.threads, "repeats": self.repeats, "warmup": self.warmup}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_terminal(self) -> str:
        """A small aligned table (one row per model, then the ratios) and how it was measured."""
        rows = [("", "parameters", "non-zero", "FLOPs", "FLOPs non-zero", "latency")]
        for s in (self.model, self.baseline):
            if s is not None:
                rows.append((s.name, human_count(s.params), human_count(s.nonzeros), human_flops(s.flops),
                             human_flops(s.flops_nonzero), f"{s.median_ms:.3f} ms"))
        r = self.ratios()
        if r:
            rows.append(("model / baseline", f"x{r['params']:.3f}", f"x{r['nonzeros']:.3f}", f"x{r['flops']:.3f}",
                         f"x{r['flops_nonzero']:.3f}", f"x{r['speedup']:.3f} faster"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.append(f"latency: median of {self.repeats} forwards after {self.warmup} warm-up, "
                     f"{'models taking turns, ' if r else ''}{self.threads} threads; FLOPs: the prunable layers "
                     "and head, 2 per multiply-add, per forward of the example input")
        return "\n".join(lines)

    to_markdown = to_terminal  # the table is plain text; prunekit report puts it in a code block


def speed_report(model: nn.Module, example_inputs: Any, baseline: nn.Module | None = None, *,
                 names: tuple[str, str] = ("model", "baseline"), repeats: int = 10, warmup: int = 2) -> SpeedReport:
    """Parameters, FLOPs and measured latency of ``model`` (and ``baseline``, measured in turn
    with it) on ``example_inputs`` (a tensor, tuple or mapping, as for calibration)."""
    models = {names[0]: model} if baseline is None else {names[0]: model, names[1]: baseline}
    if len(models) < (1 if baseline is None else 2):
        raise ValueError(f"names must differ, got {names!r}")
    times = forward_latency(models, example_inputs, repeats=repeats, warmup=warmup)
    rows = []
    for name, m in models.items():
        r = model_report(m, example_inputs)
        rows.append(ModelSpeed(name, r.total_params, r.total_nonzeros, r.flops_dense, r.flops_sparse,
                               statistics.median(times[name]), times[name]))
    return SpeedReport(rows[0], rows[1] if baseline is not None else None, torch.get_num_threads(), repeats, warmup)
