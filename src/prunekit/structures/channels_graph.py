"""Coupled channel groups of a CNN, found from its ``torch.fx`` graph.

A channel can only leave a CNN everywhere at once: the out-channel of the conv that writes it,
its BatchNorm entry, every conv that reads it (an input channel) and, through a residual
addition, every other conv writing into the same stream. The graph from
``torch.fx.symbolic_trace`` (shapes from ``ShapeProp`` on an example batch) is walked once;
each tensor carries one id per channel (dim 1), and operations couple ids in a union-find:

- conv / Linear: a *consumer* of its input ids and a *producer* of fresh output ids;
- BatchNorm, activations, pooling, dropout: the same ids pass through (BatchNorm entries join);
- depthwise conv (``groups == in == out``): input = output channels, coupled through;
- ``+ - * /`` of same-width tensors (residuals, squeeze-excitation gates): ids unite
  elementwise; a broadcast operand (width 1) couples nothing;
- ``cat`` on channels: the ids side by side (channel offsets); flatten of ``[N, C, H, W]``: each
  id repeated ``H * W`` times, so a channel is ``H * W`` columns of the Linear that follows.

The model's input and output channels, constants, and excluded modules (traced as leaves) are
*frozen*: a group touching one is never pruned. Anything else (grouped convs, slicing, unknown
modules and functions, a module called twice) raises ``ValueError`` naming the module.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .channel_types import ChannelGraph, ChannelGroup, LayerInfo, Member
from .channels_walk import _Walker
from .mha import PrunedMultiheadAttention

__all__ = ["ChannelGraph", "ChannelGroup", "LayerInfo", "Member", "find_channel_groups"]


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, with excluded and passthrough modules (and the attention
    drop-in) kept as leaves and the module being traced remembered, so a failure can name it."""

    def __init__(self, exclude: re.Pattern | None, passthrough: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.exclude, self.passthrough, self.stack = exclude, passthrough, []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return bool(self.exclude and qualname and self.exclude.search(qualname)) or qualname in self.passthrough \
            or isinstance(m, PrunedMultiheadAttention) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def _exclude_pattern(exclude: str | Iterable[str] | None) -> re.Pattern | None:
    if exclude is None or exclude == () or exclude == []:
        return None
    if isinstance(exclude, str):
        return re.compile(exclude)
    names = list(exclude)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"exclude must be a regex or a list of module names, got {exclude!r}")
    return re.compile("^(" + "|".join(re.escape(n) for n in names) + r")(\.|$)") if names else None


def passthrough_names(model: nn.Module, passthrough: Iterable[str] | None) -> frozenset[str]:
    """The modules declared to map channel c of their input to channel c of their output; a
    ValueError for a name the model lacks or a module holding parameters or buffers (which the
    surgery would have to resize)."""
    if passthrough is None:
        return frozenset()
    if isinstance(passthrough, str) or not all(isinstance(n, str) for n in passthrough):
        raise TypeError(f"passthrough must be a list of module names, got {passthrough!r}")
    modules = dict(model.named_modules())
    for name in passthrough:
        if name not in modules or not name:
            close = difflib.get_close_matches(name, list(modules), n=1)
            raise ValueError(f"passthrough: the model has no module {name!r}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        held = [n for n, _ in (*modules[name].named_parameters(), *modules[name].named_buffers())]
        if held:
            raise ValueError(f"passthrough: {name} holds {held[0]!r}, which would have to lose the removed "
                             f"channels; exclude it instead (exclude=[{name!r}]) to keep its channels")
    return frozenset(passthrough)


def trace(model: nn.Module, example: tuple, exclude: str | Iterable[str] | None = None,
          passthrough: frozenset[str] = frozenset()) -> fx.GraphModule:
    """``model`` traced by torch.fx (excluded and passthrough modules as leaves) with shapes from
    ``example``; a ValueError naming the module whose forward cannot be traced, and the two fixes."""
    tracer = _Tracer(_exclude_pattern(exclude), passthrough)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, ...)
        where = tracer.stack[-1] if tracer.stack else "the model's own forward"
        raise ValueError(f"torch.fx cannot trace {where or 'the model'} ({type(e).__name__}: {e}); "
                         f"exclude it (exclude=[{where!r}]) to keep its channels as they are, or, if it maps "
                         f"each channel to the same channel and holds no parameters (an activation, a gate), "
                         f"declare it (passthrough=[{where!r}]) so its channels can still go") from e
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    return gm



def find_channel_groups(model: nn.Module, example: Any, exclude: str | Iterable[str] | None = None,
                        passthrough: Iterable[str] | None = None) -> ChannelGraph:
    """The coupled channel groups of ``model`` traced with torch.fx, shapes from ``example`` (one
    input batch: a tensor, or a tuple of positional inputs). ``exclude``: a regex or a list of
    module names traced as opaque leaves whose channels stay as they are. ``passthrough``: module
    names the user declares to map channel c to channel c with no parameters (e.g. one torch.fx
    cannot trace): traced as leaves, their channels couple input to output."""
    example = example if isinstance(example, tuple) else (example,)
    declared = passthrough_names(model, passthrough)
    gm = trace(model, example, exclude, declared)
    walker = _Walker(gm, _exclude_pattern(exclude), declared)
    walker.run()
    find = walker.uf.find
    by_class: dict[int, dict[tuple[str, str], list[int]]] = {}
    for module, role, pos, element in walker.positions:
        by_class.setdefault(find(element), {}).setdefault((module, role), []).append(pos)
    order = {n: i for i, n in enumerate(walker.layers)}
    keyed: dict[tuple, list[dict[tuple[str, str], list[int]]]] = {}
    for root, members in sorted(by_class.items(), key=lambda kv: min(min(v) for v in kv[1].values())):
        key = (walker.uf.is_frozen(root), tuple(sorted((m, r, len(p)) for (m, r), p in members.items())))
        keyed.setdefault(key, []).append(members)
    groups, frozen = [], []
    for (is_frozen, key), channels in keyed.items():
        ordered = sorted(key, key=lambda t: (order.get(t[0], len(order)), t[1]))
        channels.sort(key=lambda ch: tuple(ch[(ordered[0][0], ordered[0][1])]))
        members = tuple(Member(m, r, torch.tensor([ch[(m, r)] for ch in channels], dtype=torch.long))
                        for m, r, _ in ordered)
        (frozen if is_frozen else groups).append(ChannelGroup(members, len(channels)))
    elements = {(m, r, p): e for m, r, p, e in walker.positions}
    return ChannelGraph(groups, frozen, walker.layers, elements, find)

