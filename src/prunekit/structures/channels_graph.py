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

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["ChannelGraph", "ChannelGroup", "LayerInfo", "Member", "find_channel_groups"]

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                nn.Tanh, nn.Mish, nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, torch.sigmoid, F.sigmoid, F.hardswish,
                  F.hardsigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                  F.adaptive_max_pool2d}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_"}
RESHAPES = {torch.flatten, "flatten", "view", "reshape", "mean", "amax", "sum", torch.mean}
BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv, torch.add,
          torch.mul, torch.sub, "add", "add_", "mul", "mul_", "sub", "div"}


@dataclass
class Member:
    """One module's share of a group: ``role`` ``"out"`` (conv/Linear output rows), ``"in"``
    (conv input channels or Linear input columns), ``"bn"`` (BatchNorm entries) or ``"dw"``
    (a depthwise conv's channels); ``index[c]`` the positions of the group's channel ``c`` on that
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

    kind: str  # "conv", "dw" or "linear"
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

    def class_index(self) -> dict[int, tuple[int, int]]:
        """class -> (index of its group in ``groups``, its channel within the group)."""
        out = {}
        for g, group in enumerate(self.groups):
            m = group.members[0]
            for c in range(group.count):
                out[self.class_of(self.elements[(m.module, m.role, int(m.index[c, 0]))])] = (g, c)
        return out


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, with excluded modules kept as leaves and the module being
    traced remembered, so a failure can name it."""

    def __init__(self, exclude: re.Pattern | None) -> None:
        super().__init__()
        self.exclude, self.stack = exclude, []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return bool(self.exclude and qualname and self.exclude.search(qualname)) or super().is_leaf_module(m, qualname)

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


def trace(model: nn.Module, example: tuple, exclude: str | Iterable[str] | None = None) -> fx.GraphModule:
    """``model`` traced by torch.fx (excluded modules as leaves) with shapes from ``example``;
    a ValueError naming the module whose forward cannot be traced."""
    tracer = _Tracer(_exclude_pattern(exclude))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, ...)
        where = tracer.stack[-1] if tracer.stack else "the model's own forward"
        raise ValueError(f"torch.fx cannot trace {where or 'the model'} ({type(e).__name__}: {e}); "
                         f"exclude it (exclude=[{where!r}]) to keep its channels as they are") from e
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    return gm


class _UnionFind:
    """Union-find over channel ids; a class is frozen when any of its ids is."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []

    def new(self, n: int, frozen: bool = False) -> list[int]:
        ids = list(range(len(self.parent), len(self.parent) + n))
        self.parent += ids
        self.frozen += [frozen] * n
        return ids

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the lower root wins (deterministic)
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.frozen[lo] = self.frozen[lo] or self.frozen[hi]

    def freeze(self, x: int) -> None:
        self.frozen[self.find(x)] = True

    def is_frozen(self, x: int) -> bool:
        return self.frozen[self.find(x)]


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack)[-1] if stack else ""
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{what!r} in {'module ' + repr(owner) if owner else 'the top-level forward'}"


class _Walker:
    """One pass over the graph: ids per tensor node, members per module role, layers."""

    def __init__(self, gm: fx.GraphModule, exclude: re.Pattern | None) -> None:
        self.gm, self.exclude = gm, exclude
        self.uf = _UnionFind()
        self.ids: dict[fx.Node, list[int]] = {}
        self.positions: list[tuple[str, str, int, int]] = []  # (module, role, position, element)
        self.layers: dict[str, LayerInfo] = {}
        self.modules = dict(gm.named_modules())

    def fail(self, node: fx.Node, why: str) -> None:
        raise ValueError(f"cannot follow channels through {_where(node)}: {why}; exclude the module that holds it "
                         "(exclude=[name]) to keep its channels as they are")

    def fresh(self, node: fx.Node, frozen: bool) -> list[int]:
        shape = _shape(node)
        return self.uf.new(shape[1] if shape and len(shape) >= 2 else 0, frozen)

    def record(self, module: str, role: str, ids: list[int]) -> list[int]:
        own = self.uf.new(len(ids))
        for p, (a, b) in enumerate(zip(own, ids)):
            self.uf.union(a, b)
            self.positions.append((module, role, p, a))
        return own

    def freeze(self, args: Iterable[Any]) -> None:
        for a in args:
            for i in self.ids.get(a, []) if isinstance(a, fx.Node) else []:
                self.uf.freeze(i)

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.ids]

    def run(self) -> None:
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
                if calls[node.target] > 1:
                    self.fail(node, "it is called more than once (shared weights)")
            if node.op == "output":
                self.freeze(node.all_input_nodes)
                continue
            if _shape(node) is None:
                if node.op in ("call_function", "call_method") and any(a in self.ids for a in node.all_input_nodes) \
                        and node.target not in ("size", "dim") and node.target is not getattr:
                    self.fail(node, "its result is not a tensor the walk can follow")
                continue
            if node.op in ("placeholder", "get_attr"):
                self.ids[node] = self.fresh(node, frozen=True)
            elif node.op == "call_module":
                self.ids[node] = self.module(node)
            else:
                self.ids[node] = self.function(node)

    def module(self, node: fx.Node) -> list[int]:
        name, m = node.target, self.modules[node.target]
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        ids = self.ids.get(src, [])
        if self.exclude and self.exclude.search(name):
            self.freeze(node.all_input_nodes)
            return self.fresh(node, frozen=True)
        width = getattr(m, "in_channels", getattr(m, "in_features", None))
        if isinstance(m, (nn.Conv2d, nn.Linear)) and len(ids) != width:
            self.fail(node, f"its input's channels ({len(ids)}) could not be followed to its {width} inputs")
        if isinstance(m, nn.Conv2d):
            out_shape = _shape(node)
            if m.groups == 1:
                kernel = m.kernel_size[0] * m.kernel_size[1]
                self.layers[name] = LayerInfo("conv", self.record(name, "in", ids), [],
                                              out_shape[2] * out_shape[3] * kernel, kernel, m.bias is not None)
                self.layers[name].outs = self.record(name, "out", self.uf.new(m.out_channels))
                return self.layers[name].outs
            if m.groups == m.in_channels == m.out_channels:
                own = self.record(name, "dw", ids)
                kernel = m.kernel_size[0] * m.kernel_size[1]
                self.layers[name] = LayerInfo("dw", own, own, out_shape[2] * out_shape[3] * kernel, kernel,
                                              m.bias is not None)
                return own
            self.fail(node, f"a grouped convolution (groups={m.groups}) couples channels within groups, "
                            "which prunekit does not resize")
        if isinstance(m, nn.Linear):
            shape = _shape(node)
            if len(shape) != 2:
                self.fail(node, f"a Linear on a {len(shape)}-d tensor (prunekit follows [N, features] only)")
            info = LayerInfo("linear", self.record(name, "in", ids), [], 1, 1, m.bias is not None)
            info.outs = self.record(name, "out", self.uf.new(m.out_features))
            self.layers[name] = info
            return info.outs
        if isinstance(m, nn.BatchNorm2d):
            return self.record(name, "bn", ids)
        if isinstance(m, PASS_MODULES):
            return ids
        if isinstance(m, nn.Flatten):
            return self.reshape(node, ids)
        self.fail(node, f"{type(m).__name__} is not a layer prunekit can resize or pass channels through")

    def function(self, node: fx.Node) -> list[int]:
        target = node.target
        args = self.tensor_args(node)
        if target in PASS_FUNCTIONS or target in PASS_METHODS:
            return self.ids[node.args[0]]
        if target in RESHAPES:
            return self.reshape(node, self.ids[node.args[0]])
        if target in BINARY:
            return self.binary(node, args)
        if target is torch.cat:
            return self.cat(node)
        self.fail(node, "an operation prunekit does not know how channels pass through")

    def reshape(self, node: fx.Node, ids: list[int]) -> list[int]:
        before, after = _shape(node.args[0]), _shape(node)
        if len(after) >= 2 and after[0] == before[0] and after[1] == before[1] and \
                (node.target not in ("mean", "amax", "sum", torch.mean) or 1 not in _dims(node)):
            return ids
        if len(before) == 4 and after == (before[0], before[1] * before[2] * before[3]):
            return [i for i in ids for _ in range(before[2] * before[3])]
        self.fail(node, f"a reshape from {list(before)} to {list(after)} mixes channels with other axes")

    def binary(self, node: fx.Node, args: list[fx.Node]) -> list[int]:
        out = _shape(node)
        width = out[1] if len(out) >= 2 else 0
        full = [a for a in args if len(_shape(a)) == len(out) and _shape(a)[1] == width]
        for a in args:
            s = _shape(a)
            if a in full:
                continue
            aligned = len(s) - len(out) + 1  # which of its axes broadcasts against the channels
            if 0 <= aligned < len(s) and s[aligned] != 1:
                for i in self.ids[full[0]] if full else []:
                    self.uf.freeze(i)  # a per-channel operand of another layout: keep these channels
        for a in full[1:]:
            for i, j in zip(self.ids[full[0]], self.ids[a]):
                self.uf.union(i, j)
        return self.ids[full[0]] if full else self.fresh(node, frozen=True)

    def cat(self, node: fx.Node) -> list[int]:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        if dim % rank == 1:
            return [i for p in parts for i in self.ids[p]]
        for p in parts[1:]:
            for i, j in zip(self.ids[parts[0]], self.ids[p]):
                self.uf.union(i, j)
        return self.ids[parts[0]]


def _dims(node: fx.Node) -> set[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    rank = len(_shape(node.args[0]))
    return {d % rank for d in dims if isinstance(d, int)}


def find_channel_groups(model: nn.Module, example: Any, exclude: str | Iterable[str] | None = None) -> ChannelGraph:
    """The coupled channel groups of ``model`` traced with torch.fx, shapes from ``example`` (one
    input batch: a tensor, or a tuple of positional inputs). ``exclude``: a regex or a list of
    module names traced as opaque leaves whose channels stay as they are."""
    example = example if isinstance(example, tuple) else (example,)
    gm = trace(model, example, exclude)
    walker = _Walker(gm, _exclude_pattern(exclude))
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
