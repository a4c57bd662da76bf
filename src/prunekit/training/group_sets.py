"""The weight groups of group pruning during training: one group per CNN channel or MLP neuron.

A *unit* (one channel of a coupled channel group, or one MLP neuron) owns the weights that write
it: its producers' output rows and biases, its BatchNorm ``gamma``/``beta`` entries, a depthwise
conv's filter. Those ``|g|`` entries are the group of the group lasso (``||w_g||_2``); owned
entries of different units never overlap, so the proximal step is exact per group. The unit's
*readers* (its consumers' input columns) are not in the norm (a conv's column would then belong
to two groups) but are zeroed with it when it is removed, so a removed unit contributes exactly
nothing whatever the activation gives at 0, and the physically smaller model equals the masked one.

Each site (a coupled channel group, or one MLP) keeps at least one unit: a target never empties a
layer. Units are ranked by ``||w_g||_2 / sqrt(|g|)`` (removed units first), ties by index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..layers.base import kind_of
from ..structures.channel_budget import macs
from ..structures.channel_surgery import shrink_channels
from ..structures.channels_graph import ChannelGraph, find_channel_groups
from ..structures.find import find_structures
from ..structures.surgery import Undo, matrix, shrink
from ..structures.units import Structure

GROUPS = ("channels", "mlp")


@dataclass
class Slice:
    """Positions ``index[i]`` (``[n, k]``) along ``axis`` of parameter ``param`` belong to unit
    ``units[i]``; ``own``: counted in the group's norm (else a reader, only zeroed with it)."""

    param: str
    axis: int
    index: torch.Tensor
    units: torch.Tensor
    own: bool


@dataclass
class Site:
    """A layer's units: ``count`` of them with ids ``start .. start + count - 1``."""

    name: str
    start: int
    count: int


@dataclass
class GroupSet:
    """Every unit's slices, its site, and the number of owned entries ``sizes[u] = |g|``."""

    kind: str
    slices: list[Slice]
    sites: list[Site]
    params: dict[str, nn.Parameter]
    graph: ChannelGraph | None = None
    structures: list[Structure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.units = sum(s.count for s in self.sites)
        self.site_of = torch.cat([torch.full((s.count,), i, dtype=torch.long) for i, s in enumerate(self.sites)])
        sizes = torch.zeros(self.units, dtype=torch.float64)
        for sl in self.slices:
            if sl.own:
                p = self.params[sl.param]
                per_position = p.numel() // p.shape[sl.axis]
                sizes.index_add_(0, sl.units, torch.full((len(sl.units),), float(per_position * sl.index.shape[1]),
                                                         dtype=torch.float64))
        self.sizes = sizes
        self.module_of = {sl.param: sl.param.rsplit(".", 1)[0] for sl in self.slices}

    # -- norms and the proximal step ---------------------------------------------------------
    @torch.no_grad()
    def sq_norms(self) -> torch.Tensor:
        """``||w_g||_2^2`` of every unit (float64)."""
        out = torch.zeros(self.units, dtype=torch.float64)
        for sl in self.slices:
            if sl.own:
                w = self.params[sl.param].detach().double()
                per = w.pow(2).transpose(0, sl.axis).reshape(w.shape[sl.axis], -1).sum(1)
                out.index_add_(0, sl.units, per[sl.index].sum(1))
        return out

    def scores(self, removed: torch.Tensor) -> torch.Tensor:
        """``||w_g||_2 / sqrt(|g|)``, -1 for removed units (so they rank first)."""
        s = self.sq_norms().sqrt() / self.sizes.clamp(min=1).sqrt()
        return torch.where(removed, torch.full_like(s, -1.0), s)

    @torch.no_grad()
    def scale_(self, factor: torch.Tensor) -> None:
        """Multiply every unit's owned entries by ``factor[u]``."""
        for sl in self.slices:
            if sl.own:
                w = self.params[sl.param]
                vec = torch.ones(w.shape[sl.axis], dtype=torch.float64)
                vec[sl.index] = factor[sl.units].unsqueeze(1).expand_as(sl.index)
                w.mul_(vec.to(w.dtype).view(_along(w, sl.axis)))

    # -- masks -------------------------------------------------------------------------------
    @torch.no_grad()
    def keep(self, removed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-shape boolean keep-masks of every parameter touched by a removed unit (owned
        entries and readers' columns)."""
        out: dict[str, torch.Tensor] = {}
        for sl in self.slices:
            gone = removed[sl.units]
            if not bool(gone.any()):
                continue
            w = self.params[sl.param]
            vec = torch.ones(w.shape[sl.axis], dtype=torch.bool)
            vec[sl.index[gone].reshape(-1)] = False
            k = vec.view(_along(w, sl.axis)).expand_as(w)
            out[sl.param] = out[sl.param] & k if sl.param in out else k.clone()
        return out

    # -- how many go -------------------------------------------------------------------------
    def order(self, scores: torch.Tensor) -> list[int]:
        """Units by ascending score (ties by index), without each site's last: a site keeps one."""
        ranked = sorted(range(self.units), key=lambda u: (float(scores[u]), u))
        last: dict[int, int] = {}
        for u in ranked:
            last[int(self.site_of[u])] = u
        final = set(last.values())
        return [u for u in ranked if u not in final]

    def counts(self, units: Iterable[int]) -> list[int]:
        """Units removed per site."""
        units = list(units)
        if not units:
            return [0] * len(self.sites)
        return torch.bincount(self.site_of[torch.tensor(units, dtype=torch.long)], minlength=len(self.sites)).tolist()

    def flops_removed(self, removed: torch.Tensor) -> float:
        """Fraction of the traced multiply-adds gone with the removed units (channels only)."""
        if self.graph is None:
            raise ValueError("FLOPs are counted on the traced channel graph: use groups='channels'")
        return 1 - macs(self.graph, self.counts(torch.nonzero(removed).flatten().tolist())) / macs(self.graph)

    def select(self, scores: torch.Tensor, fraction: float, of: str) -> torch.Tensor:
        """The lowest-ranked units removing ``fraction`` of the units (``of="groups"``, rounded) or
        at least ``fraction`` of the multiply-adds (``of="flops"``, the shortest such prefix)."""
        ranked = self.order(scores)
        out = torch.zeros(self.units, dtype=torch.bool)
        if of == "groups":
            n = round(fraction * self.units)
        else:
            lo, hi = 0, len(ranked)  # flops removed grows with the prefix: the shortest reaching it
            while lo < hi:
                mid = (lo + hi) // 2
                probe = out.clone()
                probe[ranked[:mid]] = True
                lo, hi = (mid + 1, hi) if self.flops_removed(probe) < fraction else (lo, mid)
            n = lo
        out[ranked[:n]] = True
        return out

    def check_target(self, fraction: float, of: str, where: str) -> None:
        """Raise unless ``fraction`` can be reached while every site keeps one unit."""
        most = torch.ones(self.units, dtype=torch.bool)
        most[[s.start for s in self.sites]] = False
        if of == "groups" and round(fraction * self.units) > self.units - len(self.sites):
            raise ValueError(f"{where}={fraction} removes {round(fraction * self.units)} of {self.units} units, but "
                             f"every one of the {len(self.sites)} layers must keep one; lower {where}")
        if of == "flops" and self.flops_removed(most) < fraction:
            raise ValueError(f"{where}={fraction} cannot be reached: keeping one channel in every group removes "
                             f"{100 * self.flops_removed(most):.1f}% of the multiply-adds; lower {where}")

    # -- surgery -----------------------------------------------------------------------------
    def shrink(self, model: nn.Module, removed: torch.Tensor, undo: Undo) -> dict[str, list[int]]:
        """Physically remove the units (every site keeps at least one); returns the removed unit
        indices per site."""
        out: dict[str, list[int]] = {}
        for site in self.sites:
            gone = [u - site.start for u in range(site.start, site.start + site.count) if bool(removed[u])]
            if len(gone) == site.count:
                gone = gone[1:]  # keep one (its weights and readers are zero: the output is unchanged)
            out[site.name] = gone
        if self.graph is not None:
            shrink_channels(model, self.graph, {g: out[s.name] for g, s in enumerate(self.sites) if out[s.name]}, undo)
        else:
            for s, site in zip(self.structures, self.sites):
                keep = [i for i in range(site.count) if i not in set(out[site.name])]
                if len(keep) < site.count:
                    consumer = dict(model.named_modules())[s.consumer]
                    shrink(model, s, keep, matrix(consumer)[:, keep].detach().clone(), None, undo)
        return out


def _along(w: torch.Tensor, axis: int) -> tuple[int, ...]:
    return tuple(-1 if d == axis else 1 for d in range(w.dim()))


def _params_of(model: nn.Module, module: str, names: tuple[str, ...]) -> list[str]:
    m = model.get_submodule(module)
    return [f"{module}.{n}" for n in names if isinstance(getattr(m, n, None), nn.Parameter)]


def from_channels(model: nn.Module, example, exclude=None) -> GroupSet:
    """Units = the channels of every prunable coupled group of the traced CNN. The model is traced
    in eval mode (BatchNorm statistics stay as they are) and put back in its mode."""
    was = model.training
    model.eval()
    try:
        graph = find_channel_groups(model, example, exclude)
    finally:
        model.train(was)
    if not graph.groups:
        raise ValueError("the model has no channel group prunekit can remove (every channel reaches the input, "
                         "the output or an excluded module)")
    heads = [g.name for g in graph.groups if any(m.role == "heads" for m in g.members)]
    if heads:
        raise ValueError(f"{heads[0]}: attention heads are not pruned during training (their q/k/v rows live in "
                         f"in_proj_weight); exclude the attention (exclude=[{heads[0]!r}]) to prune the rest, or "
                         "use pk.prune_channels after training")
    slices, sites, start = [], [], 0
    for group in graph.groups:
        units = torch.arange(start, start + group.count)
        for m in group.members:
            own = m.role != "in"
            names = ("weight", "bias") if own else ("weight",)
            for p in _params_of(model, m.module, names):
                slices.append(Slice(p, 0 if own else 1, m.index, units, own))
        sites.append(Site(group.name, start, group.count))
        start += group.count
    return GroupSet("channels", slices, sites, dict(model.named_parameters()), graph=graph)


def from_structures(model: nn.Module) -> GroupSet:
    """Units = the hidden neurons of every recognised transformer MLP (``find_structures``)."""
    found = find_structures(model, ("mlp",))
    if not found:
        raise ValueError("no MLP found (gate/up/down_proj, fc1/fc2, c_fc/c_proj, ...); for a CNN use "
                         "groups='channels' with example=")
    slices, sites, start = [], [], 0
    for s in found:
        units = torch.arange(start, start + s.units)
        index = torch.arange(s.units).unsqueeze(1)
        for name in s.producers:
            conv1d = kind_of(model.get_submodule(name)).name == "hf-conv1d"
            slices.append(Slice(f"{name}.weight", 1 if conv1d else 0, index, units, True))
            slices += [Slice(p, 0, index, units, True) for p in _params_of(model, name, ("bias",))]
        conv1d = kind_of(model.get_submodule(s.consumer)).name == "hf-conv1d"
        slices.append(Slice(f"{s.consumer}.weight", 0 if conv1d else 1, index, units, False))
        sites.append(Site(s.owner or "mlp", start, s.units))
        start += s.units
    return GroupSet("mlp", slices, sites, dict(model.named_parameters()), structures=found)


def build(model: nn.Module, groups: str, example=None, exclude=None) -> GroupSet:
    """The units of ``groups`` (``"channels"``: needs ``example``, one input batch; ``"mlp"``)."""
    if groups not in GROUPS:
        raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}")
    if groups == "channels":
        if example is None:
            raise ValueError("groups='channels' traces the model: pass example= (one input batch)")
        return from_channels(model, example, exclude)
    if example is not None or exclude is not None:
        raise ValueError("example= and exclude= belong to groups='channels'")
    return from_structures(model)
