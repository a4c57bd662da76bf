"""Dead input columns: inputs that are zero on every calibration sample.

A weight reading a dead input cannot change the calibration loss, so SparseGPT (Frantar &
Alistarh 2023, whose reference code zeroes them) and the least-squares refits set it to zero,
and a layer comes out sparser than asked, e.g. a 3x3 convolution calibrated on small images
whose border kernel positions only see padding. With ``exact=True`` (the default of
:func:`prunekit.prune`) such weights are instead kept at their dense values wherever the support
keeps them: the support is chosen on the dense weights, a dead input scored as one carrying the
layer's mean input energy, and only the live part is refitted, so every layer keeps exactly the
requested number of non-zeros and the calibration loss is the same.
"""
from __future__ import annotations

import torch

from .stats import LayerStats


def dead_columns(stats: LayerStats | None) -> torch.Tensor | None:
    """Boolean ``[d_in]``: the input columns that were zero on all calibration data (None
    without statistics)."""
    if stats is None or stats.sq is None:
        return None
    return stats.sq == 0


def fill_dead(energy: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """``energy`` (per input column, e.g. Wanda's squared norms) with the dead columns given
    the mean of the live ones, so a selection scores their weights instead of dropping them all."""
    if dead is None or not bool(dead.any()):
        return energy
    live = energy[~dead]
    fill = live.mean() if live.numel() else torch.ones((), dtype=energy.dtype, device=energy.device)
    return torch.where(dead.to(energy.device), fill, energy)


def keep_dead_dense(weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``weight`` with each kept weight of a dead column back at its ``dense`` value (a refit
    zeroes them; on the calibration data their product with the input is zero either way)."""
    cols = dead.to(weight.device).unsqueeze(0) & mask
    return torch.where(cols, dense.to(weight.dtype), weight)
