"""Calibration batches: any iterable of tensors, tuples or mappings; labels never needed.

A labelled loader's ``(x, y)`` batches would be called as ``model(x, y)``: ``input_key`` picks
what of each batch the model takes (an index of a tuple, a key of a mapping, or a function of
the batch), so such a loader is used as it is.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Union

import torch

from ..calls import as_call


InputKey = Union[int, str, Callable[[Any], Any], None]


def pick_input(batch: Any, input_key: InputKey, index: int = 0) -> Any:
    """What the model takes of one batch (``index``: its position, for the error): the batch
    itself (None), its element ``input_key`` (an int, of a tuple or list), its entry (a str, of
    a mapping), or ``input_key(batch)`` (a function). A batch it cannot apply to is a
    TypeError/ValueError naming ``input_key``."""
    if input_key is None:
        return batch
    if callable(input_key):
        return input_key(batch)
    if isinstance(input_key, int):
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"input_key={input_key} picks an element of tuple batches, but calibration batch {index} "
                            f"is a {type(batch).__name__}; drop input_key (or pass a function of the batch)")
        if not -len(batch) <= input_key < len(batch):
            raise ValueError(f"input_key={input_key} is out of range for calibration batch {index}, a "
                             f"{type(batch).__name__} of {len(batch)}; pass the index of the inputs, e.g. 0 for (x, y)")
        return batch[input_key]
    if not isinstance(batch, Mapping) or input_key not in batch:
        keys = f" (its keys: {', '.join(map(str, batch))})" if isinstance(batch, Mapping) else ""
        raise ValueError(f"input_key={input_key!r} is no key of calibration batch {index}, a "
                         f"{type(batch).__name__}{keys}; pass the key of the model's input")
    return batch[input_key]


def collect_batches(calibration: Iterable[Any], max_batches: int | None = None,
                    input_key: InputKey = None) -> list[tuple[tuple, dict]]:
    """Materialise the calibration iterable once (it may be a one-shot generator), each batch
    reduced to the model's input by ``input_key`` (:func:`pick_input`)."""
    if calibration is None:
        raise ValueError("calibration is required for this method; pass an iterable of input batches")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise TypeError("calibration must be an iterable of batches; wrap a single batch in a list: [x]")
    calls = []
    for i, batch in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        calls.append(as_call(pick_input(batch, input_key, i)))
    if not calls:
        raise ValueError("calibration is empty; pass at least one batch of inputs")
    tensors = [t for args, kwargs in calls for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError("calibration contains NaN or Inf values; clean the inputs first")
    if tensors and all(t.numel() == 0 for t in tensors):
        raise ValueError("calibration batches hold no samples (every tensor is empty); pass at least one input")
    return calls
