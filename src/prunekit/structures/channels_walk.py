"""The walk over a traced graph that couples channel ids (see :mod:`.channels_graph` for what
couples what): a union-find over ids, one id list per tensor node, members per module role."""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .channel_types import LayerInfo
from .mha import PrunedMultiheadAttention, why_not

ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                nn.Tanh, nn.Mish, nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, torch.sigmoid, F.sigmoid, F.hardswish,
                  F.hardsigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                  F.adaptive_max_pool2d}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_"}
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # channels on axis 1 only
SPATIAL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
RESHAPES = {torch.flatten, "flatten", "view", "reshape", "mean", "amax", "sum", torch.mean}
REDUCTIONS = {"mean", "amax", "sum", torch.mean}
TRANSPOSES = {"transpose", torch.transpose, "permute", torch.permute}
BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv, torch.add,
          torch.mul, torch.sub, "add", "add_", "mul", "mul_", "sub", "div"}



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
    """One pass over the graph: ids per tensor node along its channel axis (``axis``: 1 for
    ``[N, C, ...]`` images, the last for ``[N, T, D]`` tokens), members per module role, layers."""

    def __init__(self, gm: fx.GraphModule, exclude: re.Pattern | None, passthrough: set[str] = frozenset()) -> None:
        self.gm, self.exclude, self.passthrough = gm, exclude, passthrough
        self.uf = _UnionFind()
        self.ids: dict[fx.Node, list[int]] = {}
        self.axis: dict[fx.Node, int] = {}
        self.tuples: dict[fx.Node, fx.Node] = {}  # an attention call -> the node whose ids its output [0] has
        self.positions: list[tuple[str, str, int, int]] = []  # (module, role, position, element)
        self.layers: dict[str, LayerInfo] = {}
        self.modules = dict(gm.named_modules())

    def fail(self, node: fx.Node, why: str) -> None:
        raise ValueError(f"cannot follow channels through {_where(node)}: {why}; exclude the module that holds it "
                         "(exclude=[name]) to keep its channels as they are")

    def fresh(self, node: fx.Node, frozen: bool, axis: int = 1) -> list[int]:
        shape = _shape(node)
        return self.uf.new(shape[axis] if shape and len(shape) > axis else 0, frozen)

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
                if isinstance(self.modules[node.target], ATTENTION):
                    self.attention(node)
                    continue
            if node.op == "output":
                self.freeze(node.all_input_nodes)
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.tuples:
                if node.args[1] == 0:
                    self.ids[node], self.axis[node] = self.ids[self.tuples[node.args[0]]], self.axis[self.tuples[node.args[0]]]
                continue
            if _shape(node) is None:
                if node.op in ("call_function", "call_method") and any(a in self.ids for a in node.all_input_nodes) \
                        and node.target not in ("size", "dim") and node.target is not getattr:
                    self.fail(node, "its result is not a tensor the walk can follow")
                continue
            if node.op in ("placeholder", "get_attr"):  # images [N, C, H, W]: axis 1; tokens [N, T, D]: the last
                axis = 1 if len(_shape(node)) >= 4 else max(len(_shape(node)) - 1, 0)
                self.ids[node], self.axis[node] = self.fresh(node, frozen=True, axis=axis), axis
            elif node.op == "call_module":
                self.ids[node], self.axis[node] = self.module(node)
            else:
                self.ids[node], self.axis[node] = self.function(node)

    def excluded(self, name: str) -> bool:
        return bool(self.exclude and self.exclude.search(name)) and name not in self.passthrough

    def module(self, node: fx.Node) -> tuple[list[int], int]:
        name, m = node.target, self.modules[node.target]
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        ids, axis = self.ids.get(src, []), self.axis.get(src, 1)
        if name in self.passthrough:
            before, after = _shape(src), _shape(node)
            if before is None or after is None or len(after) != len(before) or after[axis] != before[axis]:
                self.fail(node, f"declared passthrough, but its output {list(after or ())} does not keep the "
                                f"{before[axis] if before else '?'} channels of its input {list(before or ())}")
            return ids, axis
        if self.excluded(name):
            self.freeze(node.all_input_nodes)
            shape = _shape(node)
            axis = len(shape) - 1 if isinstance(m, nn.Linear) and shape else 1
            outs = self.fresh(node, frozen=True, axis=axis)
            self.count_fixed(name, m, shape, ids, outs)
            return outs, axis
        width = getattr(m, "in_channels", getattr(m, "in_features", None))
        if isinstance(m, (nn.Conv2d, nn.Linear)) and len(ids) != width:
            self.fail(node, f"its input's channels ({len(ids)}) could not be followed to its {width} inputs")
        out_shape = _shape(node)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, *SPATIAL_MODULES)) and axis != 1:
            self.fail(node, f"its channels are on axis 1, the walk followed them on axis {axis}")
        if isinstance(m, nn.Conv2d):
            kernel = m.kernel_size[0] * m.kernel_size[1]
            spatial = out_shape[2] * out_shape[3] * kernel
            if m.groups == 1:
                self.layers[name] = LayerInfo("conv", self.record(name, "in", ids), [], spatial, kernel,
                                              m.bias is not None)
                self.layers[name].outs = self.record(name, "out", self.uf.new(m.out_channels))
                return self.layers[name].outs, 1
            if m.groups == m.in_channels == m.out_channels:
                own = self.record(name, "dw", ids)
                self.layers[name] = LayerInfo("dw", own, own, spatial, kernel, m.bias is not None)
                return own, 1
            self.fail(node, f"a grouped convolution (groups={m.groups}) couples channels within groups, "
                            "which prunekit does not resize")
        if isinstance(m, nn.Linear):
            if axis != len(out_shape) - 1:
                self.fail(node, f"a Linear reads the last axis, the walk followed the channels on axis {axis}")
            tokens = math.prod(out_shape[1:-1])  # rows per sample: 1, or the tokens of [N, T, D]
            info = LayerInfo("linear", self.record(name, "in", ids), [], tokens, 1, m.bias is not None)
            info.outs = self.record(name, "out", self.uf.new(m.out_features))
            self.layers[name] = info
            return info.outs, axis
        if isinstance(m, nn.BatchNorm2d):
            return self.record(name, "bn", ids), 1
        if isinstance(m, nn.LayerNorm):  # statistics over the channel axis: its channels stay
            if axis >= len(out_shape) - len(m.normalized_shape):
                self.freeze([src])
            return ids, axis
        if isinstance(m, PASS_MODULES):
            return ids, axis
        if isinstance(m, nn.Flatten):
            return self.reshape(node, ids, axis)
        self.fail(node, f"{type(m).__name__} is not a layer prunekit can resize or pass channels through")

    def count_fixed(self, name: str, m: nn.Module, shape, ids: list[int], outs: list[int]) -> None:
        """An excluded conv or Linear keeps all its channels, but its multiply-adds and parameters
        still count in the network's totals (else ``flops=`` would be a fraction of the rest only):
        recorded with frozen ids, so that no group ever reaches it."""
        if shape is None:
            return
        bias = getattr(m, "bias", None) is not None
        if isinstance(m, nn.Conv2d) and len(shape) == 4 and len(ids) == m.in_channels:
            kernel = m.kernel_size[0] * m.kernel_size[1]
            if m.groups == 1:
                self.layers[name] = LayerInfo("conv", ids, outs, shape[2] * shape[3] * kernel, kernel, bias)
            elif m.groups == m.in_channels == m.out_channels:
                self.layers[name] = LayerInfo("dw", ids, ids, shape[2] * shape[3] * kernel, kernel, bias)
        elif isinstance(m, nn.Linear) and len(ids) == m.in_features:
            self.layers[name] = LayerInfo("linear", ids, outs, math.prod(shape[1:-1]), 1, bias)

    def attention(self, node: fx.Node) -> None:
        """``nn.MultiheadAttention`` (or its drop-in): its inputs stay; each head is a channel of a
        group (``heads``: its q, k and v rows of ``in_proj_weight``; ``in``: its ``head_dim``
        columns of ``out_proj``). Counted: ``in_proj``, ``out_proj`` and the two attention products."""
        name, m = node.target, self.modules[node.target]
        query = node.args[0] if node.args else node.kwargs.get("query")
        self.freeze(node.all_input_nodes)
        shape = _shape(query)
        if query not in self.ids or shape is None or self.axis[query] != len(shape) - 1:
            self.fail(node, "its query is not a [.., tokens, embed_dim] tensor the walk followed")
        self.tuples[node] = node
        tokens = shape[1] if len(shape) == 3 and m.batch_first else shape[0]
        if self.excluded(name):  # its heads stay; its multiply-adds still count (frozen ids)
            inner, bias = m.num_heads * m.head_dim, m.in_proj_bias is not None
            cols = self.uf.new(inner, True)
            self.layers[name] = LayerInfo("linear", self.ids[query], self.uf.new(3 * inner, True), tokens, 1, bias)
            self.layers[name + ":scores"] = LayerInfo("attn", cols, cols, 2 * tokens * tokens, 0, False)
            outs = self.uf.new(m.embed_dim, True)
            self.layers[name + ".out_proj"] = LayerInfo("linear", cols, outs, tokens, 1, m.out_proj.bias is not None)
            self.ids[node], self.axis[node] = outs, len(shape) - 1
            return
        heads, hd = m.num_heads, m.head_dim
        inner = heads * hd
        frozen = isinstance(m, nn.MultiheadAttention) and why_not(m) is not None  # no drop-in for it: heads stay
        units = self.uf.new(heads, frozen)
        bias = m.in_proj_bias is not None
        rows = self.record(name, "heads", [units[(p % inner) // hd] for p in range(3 * inner)])
        self.layers[name] = LayerInfo("linear", self.ids[query], rows, tokens, 1, bias)
        cols = [units[p // hd] for p in range(inner)]
        self.layers[name + ":scores"] = LayerInfo("attn", cols, cols, 2 * tokens * tokens, 0, False)
        out = name + ".out_proj"
        ins = self.record(out, "in", cols)
        self.layers[out] = LayerInfo("linear", ins, self.record(out, "out", self.uf.new(m.embed_dim)), tokens, 1,
                                     m.out_proj.bias is not None)
        self.ids[node], self.axis[node] = self.layers[out].outs, len(shape) - 1

    def function(self, node: fx.Node) -> tuple[list[int], int]:
        target = node.target
        args = self.tensor_args(node)
        src = node.args[0] if node.args else None
        if target in PASS_FUNCTIONS or target in PASS_METHODS:
            if target in SPATIAL_FUNCTIONS and self.axis[src] != 1:
                self.fail(node, f"pooling runs over axes 2 and 3, the walk followed the channels on axis {self.axis[src]}")
            return self.ids[src], self.axis[src]
        if target in RESHAPES:
            return self.reshape(node, self.ids[src], self.axis[src])
        if target in TRANSPOSES:
            return self.transpose(node)
        if target in BINARY:
            return self.binary(node, args)
        if target is torch.cat:
            return self.cat(node)
        self.fail(node, "an operation prunekit does not know how channels pass through")

    def reshape(self, node: fx.Node, ids: list[int], axis: int) -> tuple[list[int], int]:
        before, after = _shape(node.args[0]), _shape(node)
        if node.target in REDUCTIONS:
            dims = _dims(node)
            if axis not in dims:
                new = axis if len(after) == len(before) else axis - sum(d < axis for d in dims)
                if len(after) > new and after[new] == before[axis]:
                    return ids, new
        elif len(after) > axis and after[:axis + 1] == before[:axis + 1]:
            return ids, axis
        elif axis == 1 and len(before) == 4 and after == (before[0], before[1] * before[2] * before[3]):
            return [i for i in ids for _ in range(before[2] * before[3])], 1
        self.fail(node, f"a reshape from {list(before)} to {list(after)} mixes channels with other axes")

    def transpose(self, node: fx.Node) -> tuple[list[int], int]:
        src, rank = node.args[0], len(_shape(node))
        axis = self.axis[src]
        dims = [d for d in node.args[1:]] if len(node.args) > 1 else list(node.kwargs.values())
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if not all(isinstance(d, int) for d in dims):
            self.fail(node, "a transpose whose axes are not numbers in the graph")
        dims = [d % rank for d in dims]
        if node.target in ("transpose", torch.transpose):
            a, b = dims
            return self.ids[src], b if axis == a else a if axis == b else axis
        return self.ids[src], dims.index(axis)

    def binary(self, node: fx.Node, args: list[fx.Node]) -> tuple[list[int], int]:
        out = _shape(node)
        rank = len(out)

        def aligned(a: fx.Node) -> int:
            return self.axis[a] + rank - len(_shape(a))

        lead = next((a for a in sorted(args, key=lambda a: a.op == "get_attr") if len(_shape(a)) == rank), None)
        if lead is None:
            return self.fresh(node, frozen=True), 1
        axis = self.axis[lead]
        for a in args:
            if a is lead:
                continue
            s = (1,) * (rank - len(_shape(a))) + tuple(_shape(a))
            if aligned(a) == axis and s[axis] == out[axis] and len(self.ids[a]) == len(self.ids[lead]):
                for i, j in zip(self.ids[lead], self.ids[a]):
                    self.uf.union(i, j)
            elif s[axis] != 1:
                for i in self.ids[lead]:
                    self.uf.freeze(i)  # a per-channel operand of another layout: keep these channels
        return self.ids[lead], axis

    def cat(self, node: fx.Node) -> tuple[list[int], int]:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        axis = self.axis[parts[0]]
        if dim % rank == axis:
            return [i for p in parts for i in self.ids[p]], axis
        for p in parts[1:]:
            for i, j in zip(self.ids[parts[0]], self.ids[p]):
                self.uf.union(i, j)
        return self.ids[parts[0]], axis


def _dims(node: fx.Node) -> set[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    rank = len(_shape(node.args[0]))
    return {d % rank for d in dims if isinstance(d, int)}
