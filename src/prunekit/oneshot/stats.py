"""Per-layer input statistics gathered with forward hooks, one block at a time.

For a layer with inputs ``X_s`` on the pruned path (the current model) and ``X_t`` on the
target path (the same block input through the block's dense weights), this accumulates
``sq = sum_n x_nj^2`` (Wanda), ``H = X_s^T X_s / N`` (SparseGPT, least squares) and
``C = X_s^T X_t / N`` (least squares against the dense target). Inputs are unfolded per batch
(never the whole calibration set), and only the statistics are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..layers.base import kind_of, paired_call, pairing, unit_name
from ..sparsity.storage import storage_key
from .blocks import StopForward, swapped_weights
from .runtime.ranks import Ranks


@dataclass
class LayerStats:
    """Sums of one layer's input statistics; read them through the properties."""

    count: int = 0
    sq_sum: torch.Tensor | None = None
    h_sum: torch.Tensor | None = None
    c_sum: torch.Tensor | None = None
    t_sum: torch.Tensor | None = None
    dtype: torch.dtype = torch.float64

    @property
    def sq(self) -> torch.Tensor:
        return self.sq_sum

    @property
    def hessian(self) -> torch.Tensor:
        return self.h_sum / max(self.count, 1)

    @property
    def hessian_target(self) -> torch.Tensor | None:
        """``X_t^T X_t / N`` (only with a dense target)."""
        return None if self.t_sum is None else self.t_sum / max(self.count, 1)

    @property
    def cross(self) -> torch.Tensor | None:
        return None if self.c_sum is None else self.c_sum / max(self.count, 1)

    def add(self, xs: torch.Tensor, xt: torch.Tensor | None, want_h: bool,
            shared: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
        """Add one batch of input rows ``xs`` (and target rows ``xt``). ``shared`` memoises the
        batch's products by the rows' storage, so layers reading one input (q/k/v, gate/up)
        compute ``X^T X`` once."""
        # Each batch's products run in the activations' precision (fast fp32 BLAS, or fp32 for
        # half-precision activations); the sums over batches are kept in ``self.dtype``.
        xs = xs.detach()
        view = storage_key(xs)
        key = None if view is None else (view, want_h)
        if shared is not None and key in shared:
            sq, h = shared[key]
        else:
            if xs.dtype in (torch.float16, torch.bfloat16):
                xs = xs.float()
            sq = (xs * xs).sum(0)
            # a NaN or Inf in any row makes its column's sum of squares NaN or Inf: checking the
            # sums spares a pass over the activations
            if not torch.isfinite(sq).all():
                raise ValueError("non-finite activations reached a prunable layer (or their squares overflow "
                                 f"{str(xs.dtype).replace('torch.', '')}); check the model and calibration data")
            h = xs.T @ xs if want_h else None
            if shared is not None and key is not None:
                shared[key] = (sq, h)
        self.count += xs.shape[0]
        self.sq_sum = _accumulate(self.sq_sum, sq, self.dtype)
        if want_h:
            self.h_sum = _accumulate(self.h_sum, h, self.dtype)
        if xt is not None:
            xs = xs.float() if xs.dtype in (torch.float16, torch.bfloat16) else xs
            xt = xt.detach().to(xs.dtype)
            self.c_sum = _accumulate(self.c_sum, xs.T @ xt, self.dtype)
            self.t_sum = _accumulate(self.t_sum, xt.T @ xt, self.dtype)


def _accumulate(total: torch.Tensor | None, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total + part`` in ``dtype``, added in place: no second d_in x d_in temporary (for a
    1536-input layer in float64, two fewer 18 MiB matrices at the peak of a statistics pass).
    The first part is copied: it may be shared by layers reading one input (q/k/v)."""
    return part.to(dtype, copy=True) if total is None else total.add_(part)


class _Catcher:
    """Forward hooks that collect the unfolded inputs of some layers' units during one call,
    keyed by unit name; with ``stop_early`` the call ends once every layer has been seen (the
    rest of the block is not needed, when each layer runs once per call)."""

    def __init__(self, layers: dict[str, nn.Module], units: Mapping[str, Sequence[str]],
                 stop_early: bool = False) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {unit_name(n, u): [] for n in layers for u in units[n]}
        self.stop_early = stop_early
        self.handles = [m.register_forward_hook(self._hook(n, m, units[n]), with_kwargs=True)
                        for n, m in layers.items()]

    def _hook(self, name: str, module: nn.Module, units: Sequence[str]):
        kind = kind_of(module)

        def hook(_module, args, kwargs, _output):
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            for unit, rows in kind.unit_inputs(module, args, kwargs, units).items():
                self.rows[unit_name(name, unit)].append(rows)
            if self.stop_early and all(self.rows.values()):
                raise StopForward
        return hook

    def run(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            block(*args, **kwargs)
        except StopForward:
            pass

    def take(self) -> dict[str, torch.Tensor]:
        # One call's rows are used as they are (torch.cat would copy each layer's input: q, k and
        # v read one tensor, and three copies of it would set the peak of a decoder layer).
        out = {n: r[0] if len(r) == 1 else torch.cat(r) for n, r in self.rows.items() if r}
        for r in self.rows.values():
            r.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gather_stats(
    block: nn.Module,
    inputs: list[tuple[tuple, dict]],
    layers: dict[str, nn.Module],
    *,
    want_h: bool = True,
    dense_weights: dict[str, torch.Tensor] | None = None,
    all_layers: dict[str, nn.Module] | None = None,
    stop_early: bool = False,
    dtype: torch.dtype = torch.float64,
    units: Mapping[str, Sequence[str]] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, LayerStats]:
    """Statistics of ``layers`` over all stored block inputs, keyed by unit name
    (:func:`prunekit.layers.base.unit_name`: the module's name for a single-matrix layer);
    ``units`` picks some units of each layer (default: all). ``stop_early``: end each forward
    once every layer has been seen; only valid when each layer runs once per block call.

    With ``dense_weights`` (original weights of the block's already-pruned layers, keyed by
    name in ``all_layers``: a tensor for ``weight``, or ``{parameter name: tensor}``), each batch is also run through the dense block to get the target
    inputs ``X_t`` and the cross term ``C``. Sums are kept in ``dtype``, and summed over
    ``ranks`` when several processes calibrate together.
    """
    units = {n: tuple(units[n]) if units is not None else kind_of(m).units(m) for n, m in layers.items()}
    stats = {unit_name(n, u): LayerStats(dtype=dtype) for n in layers for u in units[n]}
    catcher = _Catcher(layers, units, stop_early)
    try:
        for args, kwargs in inputs:
            xt: dict[str, torch.Tensor] = {}
            with pairing():  # the dense twin reads the rows the pruned path chose (experts' tokens)
                catcher.run(block, args, kwargs)
                xs = catcher.take()
                if dense_weights is not None:
                    with swapped_weights(all_layers or layers, dense_weights), paired_call():
                        catcher.run(block, args, kwargs)
                    xt = catcher.take()
            shared: dict = {}
            for n, rows in xs.items():
                stats[n].add(rows, xt.get(n) if dense_weights is not None else None, want_h, shared)
            del shared
    finally:
        catcher.close()
    if ranks is not None and ranks.active:
        sum_over_ranks(stats, layers, ranks, want_h=want_h, dense=dense_weights is not None, units=units)
    return stats


def sum_over_ranks(stats: dict[str, LayerStats], layers: dict[str, nn.Module], ranks: Ranks, *,
                   want_h: bool, dense: bool, units: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add each unit's sums and counts over the ranks, in place (a rank whose batches never
    reached a unit, e.g. an expert no token of its batches was routed to, contributes zeros);
    ``stats`` is keyed by unit name, ``units`` the units of each layer (default: all)."""
    owners = {unit_name(n, u): (m, u) for n, m in layers.items()
              for u in (units[n] if units is not None else kind_of(m).units(m))}
    tensors = []
    for name, s in stats.items():
        module, unit = owners[name]
        kind = kind_of(module)
        d_in = kind.matrix(module, unit).shape[1]
        device = kind.parameter(module, unit).device
        for field, shape, wanted in (("sq_sum", (d_in,), True), ("h_sum", (d_in, d_in), want_h),
                                     ("c_sum", (d_in, d_in), dense), ("t_sum", (d_in, d_in), dense)):
            if wanted and getattr(s, field) is None:
                setattr(s, field, torch.zeros(shape, dtype=s.dtype, device=device))
            if wanted:
                tensors.append(getattr(s, field))
    counts = torch.tensor([s.count for s in stats.values()], dtype=torch.int64, device=ranks.device)
    ranks.sum(counts, *tensors)
    for s, count in zip(stats.values(), counts.tolist()):
        s.count = count
