"""Calibration batches: any iterable of tensors, tuples or mappings; labels never needed."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

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
        f"calibration batches must be tensors, tuples or mappings, got {type(batch).__name__}; "
        "pass e.g. a list of input tensors"
    )


def collect_batches(calibration: Iterable[Any], max_batches: int | None = None) -> list[tuple[tuple, dict]]:
    """Materialise the calibration iterable once (it may be a one-shot generator)."""
    if calibration is None:
        raise ValueError("calibration is required for this method; pass an iterable of input batches")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise TypeError("calibration must be an iterable of batches; wrap a single batch in a list: [x]")
    calls = []
    for i, batch in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        calls.append(as_call(batch))
    if not calls:
        raise ValueError("calibration is empty; pass at least one batch of inputs")
    tensors = [t for args, kwargs in calls for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError("calibration contains NaN or Inf values; clean the inputs first")
    if tensors and all(t.numel() == 0 for t in tensors):
        raise ValueError("calibration batches hold no samples (every tensor is empty); pass at least one input")
    return calls


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
