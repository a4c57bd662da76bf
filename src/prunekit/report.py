"""What a model's sparsity looks like, layer by layer: parameters, non-zeros and FLOPs.

Everything is read from the weight tensors (measured, never assumed), so a report is
correct for any model, however it was pruned. FLOPs count a multiply-accumulate as 2 FLOPs; a
sparse layer is credited only with its non-zero weights (an upper bound on what a kernel can save).
Without example inputs FLOPs are per output position; with them, per forward of that input.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .calls import call, eval_mode, model_device, to_device
from .layers.base import kind_of
from .layers.targets import prunable

PER_POSITION = "per output position"
PER_FORWARD = "per forward of the example input"


@dataclass
class LayerStat:
    """One prunable layer: its weight's size, non-zeros and FLOPs (dense vs. sparse)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    flops_dense: int
    flops_sparse: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0


@dataclass
class ModelReport:
    """Per-layer stats of the prunable layers, plus whole-model parameter totals.

    ``total_params`` / ``total_nonzeros`` cover every parameter of the model (tied ones once), so
    embeddings, norms and biases are included; ``sparsity`` covers the listed layers only.
    """

    layers: list[LayerStat] = field(default_factory=list)
    total_params: int = 0
    total_nonzeros: int = 0
    flops_unit: str = PER_POSITION
    #: the model's output layer (:func:`prunekit.layers.targets.find_head`), which ``prune`` leaves dense by default
    head: str | None = None

    @property
    def params(self) -> int:
        return sum(s.params for s in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(s.nonzeros for s in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def flops_dense(self) -> int:
        return sum(s.flops_dense for s in self.layers)

    @property
    def flops_sparse(self) -> int:
        return sum(s.flops_sparse for s in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every layer (with its sparsity) and the totals."""
        layers = [{**asdict(s), "shape": list(s.shape), "sparsity": s.sparsity} for s in self.layers]
        return {
            "layers": layers,
            "params": self.params,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "total_params": self.total_params,
            "total_nonzeros": self.total_nonzeros,
            "flops_dense": self.flops_dense,
            "flops_sparse": self.flops_sparse,
            "flops_unit": self.flops_unit,
            "head": self.head,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _totals_line(self, count=str, flops=str) -> str:
        return (f"Total: {count(self.nonzeros)} of {count(self.params)} prunable weights non-zero "
                f"(sparsity {self.sparsity:.2%}); model: {count(self.total_nonzeros)} of "
                f"{count(self.total_params)} parameters non-zero; FLOPs {flops(self.flops_dense)} dense, "
                f"{flops(self.flops_sparse)} sparse ({self.flops_unit})")

    def _head_line(self) -> str:
        if self.head is None or self.head not in {s.name for s in self.layers}:
            return ""
        return f"Head: {self.head} (prune() leaves it dense unless include_head=True)\n"

    def to_markdown(self) -> str:
        """A markdown table with exact counts, then a totals line."""
        rows = ["| layer | kind | shape | params | non-zeros | sparsity | FLOPs dense | FLOPs sparse |",
                "|---|---|---|--:|--:|--:|--:|--:|"]
        for s in self.layers:
            rows.append(f"| {s.name} | {s.kind} | {_shape(s.shape)} | {s.params} | {s.nonzeros} | "
                        f"{s.sparsity:.2%} | {s.flops_dense} | {s.flops_sparse} |")
        return "\n".join(rows) + "\n\n" + self._totals_line() + "\n" + self._head_line()

    def to_terminal(self) -> str:
        """An aligned plain-text table in human units (1.23M, 3.40 GFLOP), then the totals."""
        head = ("layer", "kind", "shape", "params", "non-zeros", "sparsity", "FLOPs dense", "FLOPs sparse")
        body = [(s.name or "(model)", s.kind, _shape(s.shape), human_count(s.params), human_count(s.nonzeros),
                 f"{s.sparsity:.2%}", human_flops(s.flops_dense), human_flops(s.flops_sparse)) for s in self.layers]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

        def line(r: Sequence[str]) -> str:  # text columns left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        rule = "-" * len(line(["-" * w for w in widths]))
        return "\n".join([line(head), rule, *map(line, body), rule,
                          self._totals_line(human_count, human_flops)]) + "\n" + self._head_line()


def model_report(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    types: Sequence[type[nn.Module]] | None = None,
    include_head: bool = True,
) -> ModelReport:
    """Report the sparsity and FLOPs of ``model``'s prunable layers (see :func:`find_targets`).

    With ``example_inputs`` (a tensor, tuple or mapping, as for calibration) one forward runs in
    eval mode under ``no_grad`` to count each layer's output positions; a layer called twice is
    counted twice, one never called gets 0 FLOPs. The model is left exactly as it was. The
    layers are those :func:`prunekit.prune` would prune, plus the head with ``include_head``
    (the default), found by the same rule (:func:`prunekit.layers.targets.prunable`).
    """
    found = prunable(model, types=types, include=include, exclude=exclude, include_head=include_head,
                     example_inputs=example_inputs)
    targets = found.layers
    positions = {name: 1 for name in targets}
    unit = PER_POSITION
    if example_inputs is not None:
        positions, unit = _count_positions(model, targets, example_inputs), PER_FORWARD
    layers = []
    for name, module in targets.items():
        # One row per parameter its layer kind writes (attention: in_proj_weight, out_proj.weight).
        params = kind_of(module).parameters(module)
        for pname, w in params.items():
            w = w.detach()
            nnz = int(torch.count_nonzero(w))
            # Linear and conv alike: one output position costs one MAC per weight (C_in/groups*k*C_out).
            layers.append(LayerStat(name if len(params) == 1 else f"{name}.{pname}", type(module).__name__,
                                    tuple(w.shape), w.numel(), nnz, round(2 * w.numel() * positions[name]),
                                    round(2 * nnz * positions[name])))
    params = [p.detach() for p in model.parameters()]  # parameters() yields a tied tensor once
    return ModelReport(layers, sum(p.numel() for p in params),
                       sum(int(torch.count_nonzero(p)) for p in params), unit, head=found.head)


def _out_dim(module: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "nf", "embed_dim"):  # nf: transformers' Conv1D
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return module.weight.shape[0]


def _count_positions(model: nn.Module, targets: dict[str, nn.Module], example_inputs: Any) -> dict[str, float]:
    """Output positions of each target in one forward; modules sharing a target's weight count
    towards it (a tied layer's compute is real compute). Fused experts run each expert on its
    routed tokens only: their (token, expert) pairs over the expert count, so the FLOPs are
    exact when the experts are equally sparse (a uniform budget) and their mean otherwise."""
    by_weight = {id(_first(m)): name for name, m in targets.items()}
    positions = {name: 0 for name in targets}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: Any, kwargs: dict, output: Any) -> None:
            rows = kind_of(module).unit_rows(module, inputs, kwargs)
            if rows is not None:  # fused experts: units gate_up_proj[e] and down_proj[e], each one expert
                positions[name] += sum(rows.values()) / len(rows)
                return
            output = output[0] if isinstance(output, tuple) else output  # attention: (output, weights)
            if isinstance(output, torch.Tensor):
                positions[name] += output.numel() // _out_dim(module)
        return fn

    try:
        for m in model.modules():
            if not isinstance(m, tuple(type(t) for t in targets.values())):
                continue
            name = by_weight.get(id(_first(m)))
            if name is not None:
                handles.append(m.register_forward_hook(hook(name), with_kwargs=True))
        with eval_mode(model), torch.no_grad():
            call(model, to_device(example_inputs, model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return positions


def _first(module: nn.Module) -> Any:
    """The first parameter its layer kind writes (what identifies a tied layer)."""
    return next(iter(kind_of(module).parameters(module).values()), None)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _scaled(n: float, units: Sequence[tuple[str, int]]) -> tuple[float, str, int]:
    """Pick the largest unit that keeps the rounded value below 1000 (no '1000.0k')."""
    for i, (suffix, digits) in enumerate(units):
        v = n / 1000 ** i
        if abs(round(v, digits)) < 1000 or i == len(units) - 1:
            return v, suffix, digits
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """A count in k/M/B: 12, 456.7k, 1.23M, 4.56B."""
    v, suffix, digits = _scaled(n, [("", 0), ("k", 1), ("M", 2), ("B", 2), ("T", 2)])
    return f"{v:.{digits}f}{suffix}"


def human_flops(n: float) -> str:
    """FLOPs with an SI prefix: 12 FLOP, 3.40 GFLOP."""
    v, prefix, digits = _scaled(n, [("", 0), ("k", 2), ("M", 2), ("G", 2), ("T", 2), ("P", 2)])
    return f"{v:.{digits}f} {prefix}FLOP"
