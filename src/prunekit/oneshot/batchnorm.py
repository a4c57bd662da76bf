"""Re-estimate BatchNorm running statistics after pruning.

Pruning changes every activation a BatchNorm normalises, but its running mean and variance
still describe the dense network; magnitude pruning of a CNN can collapse for that reason alone.
A few forward passes in train mode with a cumulative average (``momentum=None``) give the
statistics of the pruned network, with no gradient and no other change (the "adaptive batch
normalization" of Li et al. 2020, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network
Pruning").
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..calls import as_call, model_device, to_device

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` (1d/2d/3d, SyncBatchNorm, lazy) that track running
    statistics, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable[Any], batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` on ``data`` (an
    iterable of input batches, as for calibration: tensor, tuple or mapping), in place.

    The running buffers are reset and averaged over the first ``batches`` batches (all of them by
    default) with ``momentum=None`` (a cumulative average); each BatchNorm's momentum and every
    module's train/eval mode are restored afterwards, even on error. Only the BatchNorm buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``) change. Returns the number of
    batches used. Without BatchNorm layers nothing runs and 0 is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be a positive integer or None (all of data), got {batches!r}")
    if data is None or isinstance(data, (torch.Tensor, dict)):
        raise TypeError("data must be an iterable of input batches; wrap a single batch in a list: [x]")
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    saved = {n: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for n, m in norms.items()}
    modes = {m: m.training for m in model.modules()}
    device = model_device(model)
    used = 0
    try:
        model.eval()  # dropout and everything else as in inference; only the BatchNorms learn
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in data:
            if batches is not None and used >= batches:
                break
            args, kwargs = as_call(to_device(batch, device))
            model(*args, **kwargs)
            used += 1
        if not used:
            raise ValueError("data is empty; pass at least one batch of inputs")
    except BaseException:
        for n, m in norms.items():  # the statistics as they were
            m.running_mean.copy_(saved[n][1])
            m.running_var.copy_(saved[n][2])
            m.num_batches_tracked.copy_(saved[n][3])
        raise
    finally:
        for n, m in norms.items():
            m.momentum = saved[n][0]
        for m, training in modes.items():
            m.training = training
    return used
