"""Calibration batches: any iterable of tensors, tuples or mappings; labels never needed."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from ..calls import as_call


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
