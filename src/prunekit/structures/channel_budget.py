"""How many channels each group loses: a uniform ratio, the smallest uniform ratio that removes a
fraction of the network's multiply-adds or parameters (counted from the traced shapes: convs,
depthwise convs, Linears), or a global budget that ranks every group's channels together.

Every channel of a group has the same positions in the same layers, so the multiply-adds and
parameters left depend only on how many channels each group keeps, not on which ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocate import allocate, steps
from .channels_graph import ChannelGraph
from .units import Structure

TARGETS = ("ratio", "flops", "params")
BUDGETS = ("uniform", "global")


@dataclass
class _Terms:
    """One layer's multiply-adds: ``spatial * (ins - sum_g a_g n_g) * (outs - sum_g b_g n_g)``
    for ``n_g`` channels removed from group ``g`` (a depthwise conv: ``spatial * channels``);
    its parameters the same with ``kernel`` for ``spatial``, plus a bias per output."""

    kind: str
    spatial: int
    kernel: int
    bias: bool
    ins: int
    outs: int
    per_in: dict[int, int]
    per_out: dict[int, int]


def _terms(graph: ChannelGraph) -> list[_Terms]:
    index = graph.class_index()
    out = []
    for info in graph.layers.values():
        per_in: dict[int, int] = {}
        per_out: dict[int, int] = {}
        for ids, per in ((info.ins, per_in), (info.outs, per_out)):
            for e in ids:
                g = index.get(graph.class_of(e))
                if g is not None:
                    per[g[0]] = per.get(g[0], 0) + 1
        for g, group in enumerate(graph.groups):  # positions per channel, not in total
            for per in (per_in, per_out):
                if g in per:
                    per[g] //= group.count
        out.append(_Terms(info.kind, info.spatial, info.kernel, info.bias, len(info.ins), len(info.outs),
                          per_in, per_out))
    return out


def _count(graph: ChannelGraph, removed: list[int] | None, what: str) -> int:
    removed = removed or [0] * len(graph.groups)
    if getattr(graph, "_terms", None) is None:
        graph._terms = _terms(graph)  # the graph never changes: count its layers once
    total = 0
    for t in graph._terms:
        ins = t.ins - sum(a * removed[g] for g, a in t.per_in.items())
        per_channel = t.kind in ("dw", "attn")
        outs = ins if per_channel else t.outs - sum(b * removed[g] for g, b in t.per_out.items())
        if what == "flops":
            total += t.spatial * (ins if per_channel else ins * outs)
        else:
            total += t.kernel * (ins if per_channel else ins * outs) + (outs if t.bias else 0)
    return total


def macs(graph: ChannelGraph, removed: list[int] | None = None) -> int:
    """Multiply-adds per sample of the convs and Linears with ``removed[g]`` channels taken from
    group ``g`` (None: the dense network)."""
    return _count(graph, removed, "flops")


def params(graph: ChannelGraph, removed: list[int] | None = None) -> int:
    """Weights and biases of the convs and Linears (and attention's ``in_proj``) with ``removed[g]`` channels taken from group
    ``g`` (None: the dense network); BatchNorm entries are not counted."""
    return _count(graph, removed, "params")


def _is_heads(group) -> bool:
    return any(m.role == "heads" for m in group.members)


def _kept_multiple(group, removed: int, multiple_of: int) -> int:
    """``removed`` changed so that the channels kept are a multiple of ``multiple_of`` (the nearest,
    at least ``multiple_of``; a group of ``multiple_of`` channels or fewer keeps them all). Heads groups
    are left as they are: a head is already a block of ``head_dim`` channels."""
    if multiple_of <= 1 or _is_heads(group):
        return removed
    if group.count <= multiple_of:
        return 0
    kept = int((group.count - removed) / multiple_of + 0.5) * multiple_of
    return group.count - min(group.count, max(multiple_of, kept))


def ratio_counts(graph: ChannelGraph, ratio: float, multiple_of: int = 1) -> list[int]:
    """``round(ratio * count)`` channels from every group (halves round up); with ``multiple_of``
    the channels kept are then the nearest multiple of it (see :func:`_kept_multiple`)."""
    return [_kept_multiple(g, int(ratio * g.count + 0.5), multiple_of) for g in graph.groups]


def uniform_counts(graph: ChannelGraph, what: str, fraction: float, multiple_of: int = 1) -> list[int]:
    """The counts of the smallest uniform ratio that removes at least ``fraction`` of the
    multiply-adds (``what="flops"``) or parameters (``"params"``), kept channels rounded to
    multiples of ``multiple_of`` if given; a ValueError when even one channel left per group (or
    ``multiple_of``) removes less."""
    dense = _count(graph, None, what)
    removed = lambda counts: 1 - _count(graph, counts, what) / dense  # noqa: E731
    most = [_kept_multiple(g, g.count - 1, multiple_of) for g in graph.groups]
    noun = "multiply-adds" if what == "flops" else "parameters"
    if removed(most) < fraction:
        left = f"{multiple_of} channels (multiple_of)" if multiple_of > 1 else "one channel"
        raise ValueError(f"{what}={fraction} cannot be reached: keeping {left} in every group removes "
                         f"{100 * removed(most):.1f}% of the {noun}; lower {what}")
    lo, hi = 0.0, 1.0
    for _ in range(40):  # removed(ratio_counts(r)) grows with r
        mid = (lo + hi) / 2
        if removed([min(c, m) for c, m in zip(ratio_counts(graph, mid, multiple_of), most)]) >= fraction:
            hi = mid
        else:
            lo = mid
    return [min(c, m) for c, m in zip(ratio_counts(graph, hi, multiple_of), most)]


def flops_counts(graph: ChannelGraph, flops: float) -> list[int]:
    """:func:`uniform_counts` for a fraction of the multiply-adds."""
    return uniform_counts(graph, "flops", flops)


def _per_millisecond(graph: ChannelGraph, ranked: list, latency) -> list:
    """``ranked`` steps re-scored as accuracy cost per millisecond saved: each step's score divided
    by the milliseconds per channel it saves (``latency``: a ``ChannelLatency`` table) over the
    mean of that over all steps, so that cheap-in-time channels wait and slow ones go first."""
    removed = [0] * len(graph.groups)
    per_unit = []
    for st in sorted(ranked, key=lambda st: (st.site, st.index)):  # a group's steps in order: widths
        grp = graph.groups[st.site]
        before = grp.count - removed[st.site]
        removed[st.site] += st.units
        ms = latency.saved(grp.name, before - st.units) - latency.saved(grp.name, before)
        per_unit.append((st, max(ms, 0.0) / st.units))
    mean = sum(ms for _, ms in per_unit) / max(len(per_unit), 1)
    if mean <= 0:
        raise ValueError("latency: the table says no group saves any time; measure it again on a quiet machine "
                         "or with a larger batch")
    floor_ms = 1e-3 * mean  # a step that saves nothing still ranks, last
    return [type(st)(st.score / (max(ms, floor_ms) / mean), st.site, st.index, st.units) for st, ms in per_unit]


def global_counts(graph: ChannelGraph, scores: list[torch.Tensor], what: str, fraction: float,
                  floor: float, multiple_of: int = 1, latency=None) -> list[int]:
    """Counts from one ranking of every group's channels by score divided by its group's mean
    score (:mod:`.allocate`'s normalisation and steps), each group keeping at least ``floor`` of
    its channels (and one), and a multiple of ``multiple_of`` channels (heads groups excepted;
    a group that cannot keeps all). With ``latency`` (a ``ChannelLatency`` table), each step is
    ranked by score per millisecond saved (:func:`_per_millisecond`). ``what="ratio"``: the prefix closest to ``fraction`` of all channels;
    ``"flops"``/``"params"``: the shortest prefix that removes at least ``fraction`` of them."""
    sites = [Structure("heads" if _is_heads(grp) else "channels", str(g), (), "", grp.count)
             for g, grp in enumerate(graph.groups)]
    normed = {s.owner: v.double() / v.double().mean().clamp_min(1e-300) for s, v in zip(sites, scores)}
    if what == "ratio":
        counts = allocate(sites, normed, {s.owner: 1.0 for s in sites}, fraction * sum(s.units for s in sites), floor,
                          multiple_of)
        return [counts[s.owner] for s in sites]
    ranked = [st for i, s in enumerate(sites) for st in steps(i, s, normed[s.owner], floor, multiple_of)]
    if latency is not None:
        ranked = _per_millisecond(graph, ranked, latency)
    ranked.sort(key=lambda st: (st.score, st.site, st.index))
    dense = _count(graph, None, what)
    counts = [0] * len(sites)
    for st in ranked:
        counts[st.site] += st.units
        if 1 - _count(graph, counts, what) / dense >= fraction - 1e-12:
            return counts
    reach = 1 - _count(graph, counts, what) / dense
    raise ValueError(f"budget='global': floor={floor:g} keeps too much to remove {what}={fraction}; the floors "
                     f"allow at most {100 * reach:.1f}%; lower floor= or {what}=")
