"""``accelerate``: sparse kernels, swapped in only where they are measured to be faster.

For every pruned ``nn.Linear`` (a weight with exact zeros), on that layer's own input captured from
one forward pass of ``example_inputs``, the dense kernel is timed against the sparse ones available:

* ``csr``: ``torch.addmm(b, W_csr, x^T)^T`` (CPU or GPU);
* ``bsr``: the same with a block-sparse ``W`` (blocks of 32/16/8, the largest that divides W);
* ``semi_structured``: ``torch.sparse.to_sparse_semi_structured`` for a 2:4 weight on a CUDA GPU of
  compute capability >= 8.0 (fp16/bf16), where torch supports it.

A layer is swapped for a :class:`SparseLinear` only when its fastest kernel beats dense by
``margin`` and its output stays within tolerance of the dense layer. Then the whole model is timed,
dense against accelerated, interleaved; if it is not faster, or its outputs leave the tolerance,
every swap is undone, so ``accelerate`` never leaves a model slower than it found it (on the
measured inputs). :class:`SparseLinear` is an ``nn.Linear`` that keeps its dense parameters
(``state_dict`` keys and values do not change, ``save_pretrained`` works) and computes with a sparse
copy made at swap time: it is for inference; after changing weights call ``report.undo()`` and
accelerate again.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .calls import call

KERNELS = ("csr", "bsr", "semi_structured")


class SparseLinear(nn.Linear):
    """``nn.Linear`` computing with a sparse copy of its weight (CSR, BSR or 2:4 semi-structured)."""

    def __init__(self, linear: nn.Linear, kernel: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameters: nothing copied, state_dict unchanged
        self.register_parameter("bias", linear.bias)
        self.kernel = kernel
        self.sparse_weight, self._fn = _build(kernel, linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.sparse_weight, x, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"


def _addmm(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b.unsqueeze(1), w, x2.T) if b is not None else torch.mm(w, x2.T)
    return y.T.reshape(*x.shape[:-1], w.shape[0])


def _linear(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return F.linear(x2, w, b).reshape(*x.shape[:-1], w.shape[0])


def _build(kernel: str, w: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return _build_kernel(kernel, w)


def _build_kernel(kernel: str, w: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    if kernel == "csr":
        return w.to_sparse_csr(), _addmm
    if kernel == "bsr":
        for bs in (32, 16, 8):
            if w.shape[0] % bs == 0 and w.shape[1] % bs == 0:
                return w.to_sparse_bsr((bs, bs)), _addmm
        raise ValueError(f"no block size in (32, 16, 8) divides {tuple(w.shape)}")
    if kernel == "semi_structured":
        if not w.is_cuda or torch.cuda.get_device_capability(w.device) < (8, 0):
            raise ValueError("2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0")
        from torch.sparse import to_sparse_semi_structured
        return to_sparse_semi_structured(w), _linear
    raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")


@dataclass
class LayerChoice:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    dense_ms: float
    kernels_ms: dict[str, float | str] = field(default_factory=dict)  # ms, or why it was not available
    chosen: str = "dense"
    max_abs_error: float = 0.0


@dataclass
class AccelerateReport:
    layers: list[LayerChoice]
    model_dense_ms: float = float("nan")
    model_accelerated_ms: float = float("nan")
    reverted: str | None = None  # why every swap was undone, if it was
    tolerance: tuple[float, float] = (1e-4, 1e-4)
    _swapped: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def speedup(self) -> float:
        return self.model_dense_ms / self.model_accelerated_ms if self.model_accelerated_ms else float("nan")

    @property
    def swapped(self) -> list[str]:
        return list(self._swapped)

    def undo(self) -> None:
        """Put every original layer back."""
        if self._model is not None:
            for name, original in self._swapped.items():
                _set_module(self._model, name, original)
        self._swapped.clear()

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'shape':>12s} {'sparsity':>8s} {'dense ms':>9s}  kernels (ms)  -> chosen"]
        for r in self.layers:
            ks = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} n/a" for k, v in r.kernels_ms.items())
            lines.append(f"{r.name:40s} {'x'.join(map(str, r.shape)):>12s} {r.sparsity:8.3f} {r.dense_ms:9.3f}  {ks}  -> {r.chosen}")
        lines.append(f"model: dense {self.model_dense_ms:.3f} ms, accelerated {self.model_accelerated_ms:.3f} ms "
                     f"(x{self.speedup:.2f}); swapped {len(self._swapped)} layers"
                     + (f"; reverted: {self.reverted}" if self.reverted else ""))
        return "\n".join(lines)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _tensors(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _within(out: list[torch.Tensor], ref: list[torch.Tensor], rtol: float, atol: float) -> tuple[bool, float]:
    if len(out) != len(ref):
        return False, float("inf")
    err, ok = 0.0, True
    for a, b in zip(out, ref):
        if not a.is_floating_point():
            ok &= torch.equal(a, b)
            continue
        d = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        err = max(err, d)
        ok &= d <= atol + rtol * (float(b.float().abs().max()) if b.numel() else 0.0)
    return ok, err


@torch.no_grad()
def accelerate(
    model: nn.Module,
    example_inputs: Any,
    *,
    kernels: tuple[str, ...] = KERNELS,
    margin: float = 0.1,
    repeats: int = 10,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> AccelerateReport:
    """Swap sparse kernels into the pruned Linear layers of ``model`` where measured faster.

    ``example_inputs``: a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping
    (``model(**x)``), shaped like production inputs (timings depend on the batch). A layer's kernel
    must beat dense by ``margin`` (0.1 = 10%); outputs must stay within ``atol + rtol * max|dense|``
    of the dense ones, per layer and for the whole model. Returns an :class:`AccelerateReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; choose from {KERNELS}")
    report = AccelerateReport(layers=[], tolerance=(rtol, atol), _model=model)
    pruned = {n: m for n, m in model.named_modules()
              if type(m) is nn.Linear and m.weight.numel() and bool((m.weight == 0).any())}
    if not pruned:
        warnings.warn("accelerate: the model has no pruned Linear layers (no weight with zeros); nothing to do",
                      RuntimeWarning, stacklevel=2)
        return report
    if model.training:
        warnings.warn("accelerate: the model is in training mode; sparse kernels are for inference (weight "
                      "gradients do not flow through them) - call model.eval() first", RuntimeWarning, stacklevel=2)
    device = next(iter(pruned.values())).weight.device

    # one forward pass: each pruned layer's input and the dense outputs
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0]) if args else None)
             for n, m in pruned.items()]
    try:
        reference = _tensors(call(model, example_inputs))
    finally:
        for h in hooks:
            h.remove()

    try:
        for name, layer in pruned.items():
            if name not in inputs:
                continue  # not called by this model's forward
            x, w = inputs[name], layer.weight
            choice = LayerChoice(name, tuple(w.shape), float((w == 0).float().mean()),
                                 _time(lambda: layer(x), repeats, device))
            dense_y = layer(x)
            best, best_ms = None, choice.dense_ms * (1 - margin)
            for kernel in kernels:
                try:
                    candidate = SparseLinear(layer, kernel)
                    y = candidate(x)
                    ok, err = _within([y], [dense_y], rtol, atol)
                    if not ok:
                        choice.kernels_ms[kernel] = f"outside tolerance ({err:.2e})"
                        continue
                    ms = _time(lambda: candidate(x), repeats, device)
                except Exception as e:  # a kernel this torch / device / dtype / shape lacks
                    choice.kernels_ms[kernel] = f"unavailable: {str(e).splitlines()[0][:80]}"
                    continue
                choice.kernels_ms[kernel] = ms
                if ms < best_ms:
                    best, best_ms, choice.max_abs_error = candidate, ms, err
            if best is not None:
                choice.chosen = best.kernel
                report._swapped[name] = layer
                _set_module(model, name, best)
            report.layers.append(choice)

        if report._swapped:
            ok, _ = _within(_tensors(call(model, example_inputs)), reference, rtol, atol)
            fast = {n: model.get_submodule(n) for n in report._swapped}
            dense_ms, sparse_ms = [], []
            for _ in range(max(3, repeats // 2)):  # interleaved: the same conditions for both
                for n, original in report._swapped.items():
                    _set_module(model, n, original)
                dense_ms.append(_time(lambda: call(model, example_inputs), 1, device))
                for n, m in fast.items():
                    _set_module(model, n, m)
                sparse_ms.append(_time(lambda: call(model, example_inputs), 1, device))
            report.model_dense_ms, report.model_accelerated_ms = statistics.median(dense_ms), statistics.median(sparse_ms)
            if not ok:
                report.reverted = f"model outputs outside tolerance (rtol={rtol}, atol={atol})"
            elif report.model_accelerated_ms >= report.model_dense_ms:
                report.reverted = "the whole model was not faster with the sparse kernels"
            if report.reverted:
                for r in report.layers:
                    r.chosen = "dense"
                report.undo()
        else:
            report.model_dense_ms = report.model_accelerated_ms = _time(lambda: call(model, example_inputs),
                                                                        max(3, repeats // 2), device)
    except BaseException:
        report.undo()  # the model is left exactly as it came
        raise
    return report
