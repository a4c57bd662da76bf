"""How many channels each group loses: a uniform ratio, or the ratio that removes a fraction of
the network's multiply-adds (counted from the traced shapes: convs, depthwise convs, Linears).

Every channel of a group has the same positions in the same layers, so the multiply-adds left
depend only on how many channels each group keeps, not on which ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from .channels_graph import ChannelGraph


@dataclass
class _Terms:
    """One layer's multiply-adds: ``spatial * (ins - sum_g a_g n_g) * (outs - sum_g b_g n_g)``
    for ``n_g`` channels removed from group ``g`` (a depthwise conv: ``spatial * channels``)."""

    kind: str
    spatial: int
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
        out.append(_Terms(info.kind, info.spatial, len(info.ins), len(info.outs), per_in, per_out))
    return out


def macs(graph: ChannelGraph, removed: list[int] | None = None) -> int:
    """Multiply-adds per sample of the convs and Linears with ``removed[g]`` channels taken from
    group ``g`` (None: the dense network)."""
    removed = removed or [0] * len(graph.groups)
    if getattr(graph, "_terms", None) is None:
        graph._terms = _terms(graph)  # the graph never changes: count its layers once
    total = 0
    for t in graph._terms:
        ins = t.ins - sum(a * removed[g] for g, a in t.per_in.items())
        if t.kind == "dw":
            total += t.spatial * ins
        else:
            total += t.spatial * ins * (t.outs - sum(b * removed[g] for g, b in t.per_out.items()))
    return total


def ratio_counts(graph: ChannelGraph, ratio: float) -> list[int]:
    """``round(ratio * count)`` channels from every group (halves round up)."""
    return [int(ratio * g.count + 0.5) for g in graph.groups]


def flops_counts(graph: ChannelGraph, flops: float) -> list[int]:
    """The counts of the smallest uniform ratio that removes at least the fraction ``flops`` of the
    multiply-adds; a ValueError when even one channel left per group removes less."""
    dense = macs(graph)
    removed = lambda counts: 1 - macs(graph, counts) / dense  # noqa: E731
    most = [g.count - 1 for g in graph.groups]
    if removed(most) < flops:
        raise ValueError(f"flops={flops} cannot be reached: keeping one channel in every group removes "
                         f"{100 * removed(most):.1f}% of the multiply-adds; lower flops")
    lo, hi = 0.0, 1.0
    for _ in range(40):  # removed(ratio_counts(r)) grows with r
        mid = (lo + hi) / 2
        if removed([min(c, m) for c, m in zip(ratio_counts(graph, mid), most)]) >= flops:
            hi = mid
        else:
            lo = mid
    return [min(c, m) for c, m in zip(ratio_counts(graph, hi), most)]
