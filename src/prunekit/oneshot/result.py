"""What one-shot pruning did, layer by layer."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """One pruned layer: sparsity read from the tensor, layer-wise reconstruction error
    ``mean((X_s W'^T - X_t W0^T)^2)`` after selection and after refinement, and time."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    error_selected: float | None = None
    error_refined: float | None = None
    lookahead_before: float | None = None
    lookahead_after: float | None = None
    seconds: float = 0.0
    note: str = ""
    #: input columns zero on all calibration data (None without data)
    dead_columns: int | None = None
    #: weights the support keeps that are zero anyway (dead inputs with ``exact=False``)
    extra_zeros: int = 0


@dataclass
class PruneResult:
    """The outcome of :func:`prunekit.prune`; ``summary()`` prints a per-layer table."""

    method: str
    refine: str | None
    pattern: str
    target_sparsity: float
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: where the work ran, the statistics' precision, and the peak memory allocated there
    #: (MiB; CUDA only: one block, its activations and one layer's statistics)
    device: str = "cpu"
    stats_dtype: str = "float64"
    peak_device_mib: float | None = None
    #: whether every layer was held to its requested count (``prune(exact=...)``)
    exact: bool = True
    #: calibration batches BatchNorm statistics were re-estimated on (``recalibrate_bn``; None: not)
    bn_batches: int | None = None
    #: how many processes (torch.distributed ranks) fed calibration batches, statistics summed
    processes: int = 1
    #: ``{parameter path: (zeros, numel)}`` after pruning, over every weight expected pruned: the
    #: targets' (pruned or left dense) and the weights no layer kind handles (prunekit.oneshot.coverage)
    weights: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: ``{matrix name: why}`` of the matrices pruned by magnitude instead of the method: an expert
    #: of a mixture of experts that no calibration token was routed to
    fallbacks: dict[str, str] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """The fraction of zeros over every weight expected pruned, counted on the model's tensors
        after pruning (``weights``): what the model is, dense gaps included. Without counts (a
        result built by hand), the pruned layers' :attr:`layers_sparsity`."""
        if not self.weights:
            return self.layers_sparsity
        total = sum(n for _, n in self.weights.values())
        return sum(z for z, _ in self.weights.values()) / total if total else 0.0

    @property
    def layers_sparsity(self) -> float:
        """Achieved sparsity over the pruned layers' weights alone (read from the tensors as each
        was written)."""
        total = sum(_numel(r.shape) for r in self.layers)
        zeros = sum(r.sparsity * _numel(r.shape) for r in self.layers)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sparsity"], out["layers_sparsity"] = self.sparsity, self.layers_sparsity
        return out

    def summary(self, expand_groups: bool = False) -> str:
        """The per-layer table. A grouped convolution is pruned group by group (one entry of
        ``layers`` each, ``conv.weight[g0]``...), and is one row here: its sparsity over all its
        weights, the groups' mean errors and their total time, its shape written ``G x`` one
        group's (a depthwise conv of 3x3 kernels: ``32 x 1x1x3x3``); so are fused experts' matrices,
        ``experts.gate_up_proj [8 experts]``. ``expand_groups=True`` lists every group and expert
        (a mobile network has thousands of groups, Qwen2-MoE 2,880 expert matrices)."""
        head = f"{'layer':<40} {'shape':<18} {'sparsity':>8} {'err sel':>10} {'err ref':>10} {'time s':>7}"
        lines = [f"prunekit: {self.method}" + (f"+{self.refine}" if self.refine else "") + f", {self.pattern}", head, "-" * len(head)]
        rows = [(r, "x".join(map(str, r.shape))) for r in self.layers] if expand_groups else _fold_groups(self.layers)
        for r, shape in rows:
            lines.append(
                f"{r.name[-40:]:<40} {shape:<18} {100 * r.sparsity:>7.2f}% {_fmt(r.error_selected):>10} "
                f"{_fmt(r.error_refined):>10} {r.seconds:>7.2f}" + _dead_note(r)
            )
        for name, why in self.skipped.items():
            lines.append(f"{name[-40:]:<40} skipped: {why}")
        for name, why in self.fallbacks.items():
            lines.append(f"{name[-40:]:<40} {why}")
        peak = f", peak {self.peak_device_mib:.0f} MiB on {self.device}" if self.peak_device_mib is not None else ""
        extra = sum(r.extra_zeros for r in self.layers)
        if extra:
            lines.append(f"{extra} weights kept by the support are zero beyond the requested count (dead inputs "
                         f"zeroed with exact=False, or zero already); exact=True keeps dead inputs' weights dense")
        if self.bn_batches == 0:
            lines.append("recalibrate_bn: the model has no BatchNorm layer; nothing re-estimated")
        elif self.bn_batches is not None:
            lines.append(f"BatchNorm running statistics re-estimated on {self.bn_batches} calibration batches")
        peak += f", calibrated over {self.processes} processes" if self.processes > 1 else ""
        matrices = f" ({len(self.layers)} matrices)" if len(rows) != len(self.layers) else ""
        expected = sum(n for _, n in self.weights.values())
        if self.weights:  # the count over every weight expected pruned, the pruned layers' beside it
            lines.append(f"model: {100 * self.sparsity:.2f}% of the {expected:,} weights expected pruned are zero, "
                         f"counted on its tensors (asked {100 * self.target_sparsity:.2f}%)")
        lines.append(f"total: {100 * self.layers_sparsity:.2f}% sparse over {len(rows)} pruned layers{matrices} in "
                     f"{self.seconds:.1f} s ({self.device}, {self.stats_dtype} statistics{peak})")
        return "\n".join(lines)


#: a grouped convolution's groups (``conv.weight[g0]``: named ``conv``) and fused experts' matrices
#: (``experts.gate_up_proj[0]``: named ``experts.gate_up_proj``)
_GROUP = re.compile(r"^(.*)\.weight\[g(\d+)\]$|^(.*\.(?:gate_up_proj|down_proj))\[(\d+)\]$")


def _group_of(name: str) -> tuple[str, str] | None:
    """``(folded name, what a member is)`` of a matrix that folds into one summary row, else None."""
    match = _GROUP.match(name)
    if match is None:
        return None
    return (match.group(1), "groups") if match.group(1) is not None else (match.group(3), "experts")


def _fold_groups(layers: list[LayerReport]) -> list[tuple[LayerReport, str]]:
    """``(report, shape text)`` rows of ``layers``, each run of one grouped convolution's groups
    (``name.weight[g0]``, ...) made one report named ``name [G groups]`` (fused experts'
    ``experts.down_proj[e]``: ``experts.down_proj [E experts]``) of shape ``G x`` one
    group's: sparsity over all its weights, errors the mean over its groups (each has as many
    outputs), times, dead columns and extra zeros summed."""
    out: list[tuple[LayerReport, str]] = []
    run: list[LayerReport] = []
    for r in [*layers, None]:
        match = _group_of(r.name) if r is not None else None
        if run and (match is None or match != _group_of(run[0].name)):
            out.append((run[0], "x".join(map(str, run[0].shape))) if len(run) == 1 else _folded(run))
            run = []
        if match is not None:
            run.append(r)
        elif r is not None:
            out.append((r, "x".join(map(str, r.shape))))
    return out


def _folded(run: list[LayerReport]) -> tuple[LayerReport, str]:
    sizes = [_numel(r.shape) for r in run]
    each = "x".join(map(str, run[0].shape)) if len({tuple(r.shape) for r in run}) == 1 else "varied"
    name, members = _group_of(run[0].name)

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)

    dead = [r.dead_columns for r in run]
    return LayerReport(
        f"{name} [{len(run)} {members}]", (sum(sizes),),
        sum(r.sparsity * n for r, n in zip(run, sizes)) / sum(sizes),
        error_selected=mean([r.error_selected for r in run]), error_refined=mean([r.error_refined for r in run]),
        seconds=sum(r.seconds for r in run), dead_columns=None if all(d is None for d in dead) else sum(d or 0 for d in dead),
        extra_zeros=sum(r.extra_zeros for r in run)), f"{len(run)} x {each}"


def _dead_note(r: LayerReport) -> str:
    """The dead input columns, and the zeros they added beyond the requested count."""
    notes = [f"{r.dead_columns} dead input columns"] if r.dead_columns else []
    if r.extra_zeros:
        notes.append(f"{r.extra_zeros} extra zeros")
    return "  (" + ", ".join(notes) + ")" if notes else ""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"
