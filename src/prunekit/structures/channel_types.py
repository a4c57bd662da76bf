"""What the channel graph is made of: groups of coupled channels and their members, every traced
conv/Linear (for counting multiply-adds and parameters), and the graph that holds them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ChannelGraph", "ChannelGroup", "LayerInfo", "Member"]


@dataclass
class Member:
    """One module's share of a group: ``role`` ``"out"`` (conv/Linear output rows), ``"in"``
    (conv input channels or Linear input columns), ``"bn"`` (BatchNorm entries), ``"dw"``
    (a depthwise conv's channels) or ``"heads"`` (an attention's q, k, v rows of ``in_proj_weight``,
    one channel per head); ``index[c]`` the positions of the group's channel ``c`` on that
    axis (``[count, k]``; ``k = H * W`` for a Linear after flatten)."""

    module: str
    role: str
    index: torch.Tensor


@dataclass
class ChannelGroup:
    """Channels that leave together: ``count`` of them, each one position (or ``k``) in every member."""

    members: tuple[Member, ...]
    count: int

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role in ("out", "bn", "dw"))

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == "in")

    @property
    def name(self) -> str:
        outs = [m.module for m in self.members if m.role == "out"] or [self.members[0].module]
        return outs[0] + (f" (+{len(outs) - 1})" if len(outs) > 1 else "")


@dataclass
class LayerInfo:
    """A conv or Linear as traced: the union-find ids of its input and output positions, the
    multiply-adds per sample of one output position for one input position (``spatial``), the
    weights per (input, output) pair (``kernel``: ``kh * kw``, 1 for a Linear) and whether it has
    a bias (one parameter per output position)."""

    kind: str  # "conv", "dw", "linear" or "attn" (attention's two products: per channel, like "dw")
    ins: list[int]
    outs: list[int]
    spatial: int
    kernel: int = 1
    bias: bool = False


@dataclass
class ChannelGraph:
    """Groups that can be pruned, frozen groups, and every conv/Linear in execution order."""

    groups: list[ChannelGroup]
    frozen: list[ChannelGroup]
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    elements: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (module, role, position) -> id
    root: Any = None  # the union-find's find(): element -> class

    def class_of(self, element: int) -> int:
        return self.root(element)

    def consumers(self) -> list[str]:
        """Every module reading a group's channels, each once, in the groups' order."""
        return list(dict.fromkeys(m.module for g in self.groups for m in g.consumers))

    def attentions(self, groups: "list[ChannelGroup] | None" = None) -> list[str]:
        """The attention modules whose heads are channels of ``groups`` (default: every group)."""
        return [m.module for g in (self.groups if groups is None else groups) for m in g.members if m.role == "heads"]

    def class_index(self) -> dict[int, tuple[int, int]]:
        """class -> (index of its group in ``groups``, its channel within the group)."""
        out = {}
        for g, group in enumerate(self.groups):
            m = group.members[0]
            for c in range(group.count):
                out[self.class_of(self.elements[(m.module, m.role, int(m.index[c, 0]))])] = (g, c)
        return out
