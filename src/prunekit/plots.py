"""PNG plots: per-layer sparsity, a metric against sparsity, and pruning schedules over steps.

Figures are drawn on matplotlib's ``Figure`` + Agg canvas directly, never through pyplot, so no
GUI backend is needed and nothing stays open in pyplot's global figure list. Each function writes
one PNG (creating its folder) and returns its path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .report import ModelReport
from .training.schedules import Cyclical, ThresholdSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def _new_figure(width: float, height: float) -> tuple[Figure, Any]:
    # matplotlib is imported by the first plot, not by `import prunekit` (a second at every start)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    fig.clear()
    return path


def plot_layer_sparsity(report: ModelReport, path: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of each layer's sparsity (%), top to bottom in model order, with a dashed
    line at the overall sparsity. The figure grows with the layer count and thins out the labels
    so that 200+ layers stay readable."""
    if not isinstance(report, ModelReport):
        raise ValueError(f"plot_layer_sparsity needs a ModelReport, got {type(report).__name__}")
    if not report.layers:
        raise ValueError("the report has no layers to plot")
    n = len(report.layers)
    height = min(2.0 + 0.14 * n, 150.0)  # inches; Agg allows 2**16 pixels
    fontsize = 9 if n <= 30 else 6
    step = max(1, math.ceil(1.2 * fontsize / (72 * (height - 1.5) / n)))  # label rows that fit
    fig, ax = _new_figure(8.0, height)
    ax.barh(range(n), [100 * s.sparsity for s in report.layers], height=0.8, color="tab:blue")
    overall = 100 * report.sparsity
    ax.axvline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"overall {overall:.1f}%")
    ax.set_yticks(range(0, n, step), [report.layers[i].name or "(model)" for i in range(0, n, step)],
                  fontsize=fontsize)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.set_title(title or f"Per-layer sparsity ({n} layers)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_metric_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: str | Path, *, x: str = "sparsity",
                            y: str = "accuracy", group: str | None = "method", title: str | None = None,
                            logy: bool = False) -> Path:
    """One line with markers per ``group`` (e.g. per method) of ``y`` against ``x``, from
    benchmark-style rows; rows missing ``x`` or ``y`` (or holding None) are skipped."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(x) is None or row.get(y) is None:
            continue
        try:
            point = (float(row[x]), float(row[y]))
        except (TypeError, ValueError):
            raise ValueError(f"row values for {x!r} and {y!r} must be numbers, got {row[x]!r}, {row[y]!r}") from None
        label = "all" if group is None or row.get(group) is None else str(row[group])
        series.setdefault(label, []).append(point)
    if not series:
        raise ValueError(f"no row has both {x!r} and {y!r}; keys seen: "
                         f"{sorted({k for r in rows for k in r}) or 'none (no rows)'}")
    fig, ax = _new_figure(7.0, 4.5)
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x}")
    if group is not None:
        ax.legend(title=group, fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _schedule_label(schedule: Callable[[int], float]) -> str:
    if isinstance(schedule, ThresholdSchedule):
        return f"{schedule.kind} (beta={schedule.beta})" if schedule.kind == "pgh" else schedule.kind
    if isinstance(schedule, Cyclical):
        return "cubic (GMP)" if schedule.cycles == 1 else f"cyclical ({schedule.cycles} cycles)"
    return getattr(schedule, "__name__", type(schedule).__name__)


def plot_schedule(schedule: Callable[[int], float] | Mapping[str, Callable[[int], float]], total_steps: int,
                  path: str | Path, *, label: str | None = None, title: str | None = None) -> Path:
    """Draw ``step -> value`` over ``[0, total_steps]`` for one schedule or a dict of them.

    Sparsity schedules (Constant, Cubic, Cyclical, any callable) give the sparsity; a
    :class:`ThresholdSchedule` gives the fraction of the final threshold D. Long runs are
    sampled at about 4000 steps.
    """
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    named = dict(schedule) if isinstance(schedule, Mapping) else {label or _schedule_label(schedule): schedule}
    if not named:
        raise ValueError("no schedule to plot (empty dict)")
    for name, s in named.items():
        if not callable(s):
            raise ValueError(f"schedule {name!r} must be callable step -> value, got {type(s).__name__}")
        if isinstance(s, ThresholdSchedule) and s.kind == "exact_lats":
            raise ValueError(f"schedule {name!r} is exact_lats, which depends on the learning rates used, not the step")
    stride = max(1, total_steps // 4000)
    steps = sorted(set(range(0, total_steps + 1, stride)) | {total_steps})
    fig, ax = _new_figure(7.0, 4.0)
    for name, s in named.items():
        ax.plot(steps, [float(s(t)) for t in steps], label=name)
    thresholds = [isinstance(s, ThresholdSchedule) for s in named.values()]
    ax.set_ylabel("fraction of final threshold D" if all(thresholds)
                  else "sparsity" if not any(thresholds) else "sparsity / threshold fraction")
    ax.set_xlabel("step")
    ax.set_xlim(0, total_steps)
    ax.set_title(title or "Pruning schedule")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
