"""Which tensors share storage: the one key for tied weights (an LM head tied to its embedding).

A ``state_dict`` lists a tied weight under each of its names; the checkpoint writers store it once,
the loaders accept it stored once, and the calibration statistics compute once for an input that
several layers read. They all ask the same question, answered here.
"""
from __future__ import annotations

import torch


def storage_key(t: torch.Tensor) -> tuple | None:
    """A key equal for two tensors exactly when they are the same view of one storage (device,
    storage address, offset, shape, strides, dtype); None for an empty tensor, which shares nothing."""
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
