"""The walk over a traced graph that couples channel ids (see :mod:`.channels_graph` for what
couples what): a union-find over ids, one id list per tensor node, members per module role."""
from __future__ import annotations

import operator
import re
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .channel_types import LayerInfo

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
