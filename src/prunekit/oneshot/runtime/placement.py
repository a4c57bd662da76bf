"""Where one-shot pruning runs, and in what precision.

The model stays where the user keeps it; with an execution ``device`` one block at a time is
moved there with its inputs, pruned and moved back (as the SparseGPT reference and
llm-compressor do for decoder layers), so the device only ever holds one block, its
activations and one layer's statistics.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


def execution_device(device: str | torch.device | None) -> torch.device | None:
    """The validated execution device (None: where the model is)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device; pass e.g. 'cpu' or 'cuda'") from exc
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data; pass 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} is not available here (torch.cuda.is_available() is False); "
                             "omit device to prune where the model is, or pass device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' is not available here; omit device or pass device='cpu'")
    return dev


def stats_precision(dtype: str | torch.dtype | None, weights_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Statistics / solver precision. Default: float32 on every device (as the SparseGPT
    reference and llm-compressor do; on SmolLM2 on the CPU it was 2-12% faster than float64, with
    less memory and perplexity within rounding, ``benchmarks/results/precision.md``), or float64
    when the model's weights are float64."""
    if dtype is None:
        return torch.float64 if weights_dtype == torch.float64 else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"stats_dtype must be one of 'float32', 'float64', got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {dtype}; "
                         "half precision is too coarse for Hessians")
    return dtype


@contextlib.contextmanager
def to_block_device(modules: Sequence[nn.Module], device: torch.device, home: torch.device) -> Iterator[None]:
    """Hold ``modules`` on ``device`` for the duration, and put them back ``home`` after (also
    on error). A no-op when both are the same device."""
    if device == home:
        yield
        return
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m in modules:
            m.to(home)


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """TF32 off for matrix products and convolutions on CUDA for the duration (restored after):
    calibration statistics are float32 sums, and TF32's 10-bit mantissa in the forward passes
    moves them more than float32 vs float64 does (the SparseGPT reference turns it off too)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def peak_memory_tracker(device: torch.device) -> Callable[[], float | None]:
    """Start tracking peak allocated memory on ``device``; the returned call gives it in MiB
    (None where PyTorch does not track it: the CPU)."""
    if device.type != "cuda":
        return lambda: None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return lambda: torch.cuda.max_memory_allocated(device) / 2**20


HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def float32_working_copy(modules: Sequence[nn.Module], weights: dict[str, torch.Tensor]) -> Iterator[dict]:
    """The half-precision parameters and buffers of ``modules`` held in float32 for the
    duration (the same Parameter objects, new data), and back in their own dtype after, rounded
    once; yields ``weights`` (e.g. dense originals swapped in later) in float32 too.

    Newton-CG refits (SNOWS) need it: bfloat16's 8-bit mantissa rounds a step smaller than
    1/256 of a weight away, and losses that coarse stall the line search. Only the modules given
    (the block and the one the lookahead reads into) are converted, never the whole model.
    Modules already in float32 or float64, and weights on the meta device, are left alone."""
    changed = [(t, t.dtype) for m in modules for t in [*m.parameters(), *m.buffers()]
               if t.dtype in HALF and not t.is_meta]
    try:
        for t, _ in changed:
            t.data = t.data.float()
        yield {n: _as_float32(w) for n, w in weights.items()}
    finally:
        for t, dtype in changed:
            t.data = t.data.to(dtype)


def _as_float32(weight):
    """A half-precision tensor in float32 (a dict of them: each; anything else unchanged)."""
    if isinstance(weight, dict):
        return {k: _as_float32(v) for k, v in weight.items()}
    return weight.float() if weight.dtype in HALF else weight


def as_dtype_of(module: nn.Module, obj):
    """Floating tensors inside nested tuples/lists/dicts cast to the dtype of ``module``'s
    first floating parameter (unchanged when it has none): the input of a block held in a
    float32 working copy next to blocks left in half precision."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return obj

    def cast(x):
        if isinstance(x, torch.Tensor):
            return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cast(v) for v in x)
        return x
    return cast(obj)
