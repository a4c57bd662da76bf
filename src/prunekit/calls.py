"""Calling a model on one batch: the helpers every layer that runs a model shares.

A batch is a tensor (``model(x)``), a tuple or list (``model(*b)``) or a mapping
(``model(**b)``), as a ``DataLoader`` or a Hugging Face tokenizer yields them. One-shot
calibration, reports, loading checks and kernel timing all call models this way, so the helpers
live here, below all of them, and none of those layers imports another's internals. Where a
model dispatched with accelerate runs (``home_device``) is read here too, without importing accelerate.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Mapping

import torch
from torch import nn


def as_call(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for one batch: a tensor is ``model(x)``, a tuple/list ``model(*b)``,
    a mapping ``model(**b)``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(
        f"batches must be tensors, tuples or mappings, got {type(batch).__name__}; "
        "pass e.g. a list of input tensors"
    )


def first_input(call: tuple[tuple, dict]) -> Any:
    """The first argument of an ``(args, kwargs)`` call: its first positional one, else its
    first keyword one (None for an empty call)."""
    args, kwargs = call
    return args[0] if args else next(iter(kwargs.values()), None)


def call(model: nn.Module, batch: Any) -> Any:
    """``model`` applied to one batch, unpacked as :func:`as_call` says."""
    args, kwargs = as_call(batch)
    return model(*args, **kwargs)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def module_device(module: nn.Module) -> torch.device | None:
    """Device of a module's first parameter or buffer; None when it holds neither (it runs
    wherever its inputs are)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode inside the block; afterwards each gets back its own mode (a
    model in eval with one dropout left in train stays so), even when the block raises."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@torch.no_grad()
def forward_until(model: nn.Module, last_block: nn.Module | None, args: tuple, kwargs: dict) -> None:
    """Run ``model`` on one call, ending the forward once ``last_block`` has run (what follows,
    e.g. an LM head's logits, is never calibrated and can be the largest tensor of the forward)."""
    handle = None
    if last_block is not None and last_block is not model:
        def stop(*_):
            raise StopForward
        handle = last_block.register_forward_hook(stop)
    try:
        model(*args, **kwargs)
    except StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()


def align_hook(module: nn.Module) -> Any | None:
    """The module's accelerate ``AlignDevicesHook`` (also inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if h is not None and all(hasattr(h, a) for a in ("offload", "weights_map", "execution_device")):
            return h
    return None


def home_device(model: nn.Module) -> torch.device:
    """Where the model's front runs: its first hook's execution device for a dispatched model
    (its weights may all be on the meta device), else the device of its first parameter."""
    for m in model.modules():
        hook = align_hook(m)
        if hook is not None and hook.execution_device is not None:
            dev = hook.execution_device
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return model_device(model)


def forward_latency(models: Mapping[str, nn.Module], example_inputs: Any, *, repeats: int = 10,
                    warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds of each of ``repeats`` forwards per model (after ``warmup`` uncounted ones),
    the models taking turns on the same inputs, in eval mode without gradients. The models are
    left as they were (modes included)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    inputs = {name: to_device(example_inputs, model_device(m)) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, m in models.items():
                with eval_mode(m):
                    device = model_device(m)
                    _sync(device)
                    t0 = time.perf_counter()
                    call(m, inputs[name])
                    _sync(device)
                    if i >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
