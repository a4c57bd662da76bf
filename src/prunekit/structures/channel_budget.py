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


def _by_site(ranked: list) -> dict[int, list]:
    """Each group's steps, in order (their widths)."""
    out: dict[int, list] = {}
    for st in sorted(ranked, key=lambda st: (st.site, st.index)):
        out.setdefault(st.site, []).append(st)
    return out


def _along(graph: ChannelGraph, sts: list, value) -> list[float]:
    """What each of a group's steps (in order) adds to ``value(group name, kept channels)``, which
    never falls as channels go (a measured table: milliseconds saved, output error)."""
    grp, removed, out = graph.groups[sts[0].site], 0, []
    for st in sts:
        before = grp.count - removed
        removed += st.units
        out.append(max(value(grp.name, before - st.units) - value(grp.name, before), 0.0))
    return out


def _pooled(sts: list, costs: list[float], amounts: list[float], floor: float, scale: float) -> list:
    """A group's steps re-scored as cost per amount (times ``scale``; an amount below ``floor``
    per channel counts as ``floor``). The steps must go in order, and measured tables change in
    jumps (a kernel's vector width), so a step with a high cost per amount before one with a low
    one is pooled with it: adjacent steps merged into one cost per amount until the costs rise along
    the group (isotonic pooling, the convex hull of the group's cost against the amount)."""
    blocks: list[list] = []  # [cost, amount, steps]
    for st, cost, amount in zip(sts, costs, amounts):
        blocks.append([cost, amount, [st]])  # cost / 0: infinite, pooled with what follows
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            cost_, amount_, grouped = blocks.pop()
            blocks[-1][0] += cost_
            blocks[-1][1] += amount_
            blocks[-1][2] += grouped
    out = []
    for cost, amount, grouped in blocks:
        amount = max(amount, floor * sum(st.units for st in grouped))
        out += [type(st)(cost / amount * scale if cost else 0.0, st.site, st.index, st.units) for st in grouped]
    return out


def _by_sensitivity(graph: ChannelGraph, ranked: list, sensitivity) -> list:
    """``ranked`` steps re-scored by measured output error per channel (``sensitivity``: a
    ``ChannelSensitivity`` table), a group's steps pooled so that they rise (:func:`_pooled`)."""
    out = []
    for sts in _by_site(ranked).values():
        out += _pooled(sts, _along(graph, sts, sensitivity.cost), [float(st.units) for st in sts], 1.0, 1.0)
    return out


def _per_millisecond(graph: ChannelGraph, ranked: list, latency) -> list:
    """``ranked`` steps re-scored as accuracy cost per millisecond saved: each step's cost (score
    times channels) over the milliseconds it saves (``latency``: a ``ChannelLatency`` table), times
    the mean milliseconds per channel, so that channels slow to compute but cheap in accuracy go
    first; a group's steps pooled so that they rise (:func:`_pooled`)."""
    sites = _by_site(ranked)
    saved = {site: _along(graph, sts, latency.saved) for site, sts in sites.items()}
    units = sum(st.units for sts in sites.values() for st in sts)
    mean = sum(sum(ms) for ms in saved.values()) / max(units, 1)  # ms per channel, over every step
    if mean <= 0:
        raise ValueError("latency: the table says no group saves any time; measure it again on a quiet machine "
                         "or with a larger batch")
    out = []
    for site, sts in sites.items():  # a step that saves nothing still ranks, last (floor: 1e-3 of the mean)
        out += _pooled(sts, [st.score * st.units for st in sts], saved[site], 1e-3 * mean, mean)
    return out


def global_counts(graph: ChannelGraph, scores: list[torch.Tensor], what: str | None, fraction: float | None,
                  floor: float, multiple_of: int = 1, latency=None, speedup: float | None = None,
                  sensitivity=None) -> list[int]:
    """Counts from one ranking of every group's channels by score divided by its group's mean
    score (:mod:`.allocate`'s normalisation and steps), each group keeping at least ``floor`` of
    its channels (and one), and a multiple of ``multiple_of`` channels (heads groups excepted;
    a group that cannot keeps all). With ``latency`` (a ``ChannelLatency`` table), each step is
    ranked by score per millisecond saved (:func:`_per_millisecond`); with ``sensitivity`` (a
    ``ChannelSensitivity`` table) a step's score is the output error it adds per channel, measured,
    instead of the normalised score (:func:`_by_sensitivity`). ``what="ratio"``: the prefix
    closest to ``fraction`` of all channels; ``"flops"``/``"params"``: the shortest prefix that
    removes at least ``fraction`` of them. ``speedup`` (with ``latency``): first the shortest prefix
    of the per-millisecond ranking that the table predicts runs ``speedup`` times faster than dense,
    then, if ``what`` is given and not yet reached, the remaining steps by score alone."""
    sites = [Structure("heads" if _is_heads(grp) else "channels", str(g), (), "", grp.count)
             for g, grp in enumerate(graph.groups)]
    normed = {s.owner: v.double() / v.double().mean().clamp_min(1e-300) for s, v in zip(sites, scores)}
    if what == "ratio":
        counts = allocate(sites, normed, {s.owner: 1.0 for s in sites}, fraction * sum(s.units for s in sites), floor,
                          multiple_of)
        return [counts[s.owner] for s in sites]
    ranked = [st for i, s in enumerate(sites) for st in steps(i, s, normed[s.owner], floor, multiple_of)]
    if sensitivity is not None:
        ranked = _by_sensitivity(graph, ranked, sensitivity)
    order = lambda sts: sorted(sts, key=lambda st: (st.score, st.site, st.index))  # noqa: E731
    by_score = order(ranked)
    by_time = order(_per_millisecond(graph, ranked, latency)) if latency is not None else by_score
    counts = [0] * len(sites)
    taken: set[tuple[int, int]] = set()

    def take(ranking: list, done) -> bool:
        for st in ranking:
            if done():
                return True
            if (st.site, st.index) not in taken:
                taken.add((st.site, st.index))
                counts[st.site] += st.units
        return done()

    if speedup is not None:
        fast = lambda: latency.predicted_speedup(  # noqa: E731
            {g.name: g.count - n for g, n in zip(graph.groups, counts)}) >= speedup - 1e-12
        if not take(by_time, fast):
            most = latency.predicted_speedup({g.name: g.count - n for g, n in zip(graph.groups, counts)})
            raise ValueError(f"speedup={speedup:g} cannot be reached: the latency table predicts at most x{most:.2f} "
                             f"with every group at its floor (floor={floor:g}); lower speedup= or floor=, or measure "
                             f"the table with a larger batch")
    if what is None:
        return counts
    dense = _count(graph, None, what)
    reached = lambda: 1 - _count(graph, counts, what) / dense >= fraction - 1e-12  # noqa: E731
    if take(by_time if speedup is None else by_score, reached):
        return counts
    reach = 1 - _count(graph, counts, what) / dense
    raise ValueError(f"budget='global': floor={floor:g} keeps too much to remove {what}={fraction}; the floors "
                     f"allow at most {100 * reach:.1f}%; lower floor= or {what}=")
