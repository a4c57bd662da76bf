"""Making a CNN physically narrower: Conv2d, depthwise Conv2d, BatchNorm2d, Linear and the
``nn.MultiheadAttention`` drop-in (:mod:`.mha`: whole heads) lose the positions of the removed channels, in place (module names and ``state_dict`` keys stay), each
change recorded in an :class:`Undo` log first.
"""
from __future__ import annotations

import torch
from torch import nn

from .channels_graph import ChannelGraph
from .surgery import Undo, keep_outputs


def _keep(size: int, removed: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def removed_positions(graph: ChannelGraph, removed: dict[int, list[int]]) -> dict[tuple[str, str], set[int]]:
    """(module, role) -> the positions that go, for ``removed[g]`` channels of group ``g``."""
    out: dict[tuple[str, str], set[int]] = {}
    for g, channels in removed.items():
        for m in graph.groups[g].members:
            out.setdefault((m.module, m.role), set()).update(m.index[channels].reshape(-1).tolist())
    return out


def shrink_channels(model: nn.Module, graph: ChannelGraph, removed: dict[int, list[int]], undo: Undo) -> None:
    """Remove the channels ``removed[g]`` (indices within group ``g``) from every member module."""
    gone = removed_positions(graph, removed)
    modules = dict(model.named_modules())
    for name in dict.fromkeys(m for m, _ in gone):
        m = modules[name]
        out_r, in_r = gone.get((name, "out"), set()), gone.get((name, "in"), set())
        if (name, "heads") in gone:  # the attention drop-in: q, k, v rows of the removed heads
            rows = m.in_proj_weight.shape[0]
            keep = _keep(rows, gone[(name, "heads")])
            keep_outputs(m, keep, undo)
            undo.set(m, "num_heads", len(keep) // (3 * m.head_dim))
        elif isinstance(m, nn.BatchNorm2d):
            keep = _keep(m.num_features, gone[(name, "bn")])
            for attr in ("weight", "bias"):
                if getattr(m, attr) is not None:
                    undo.set(m, attr, _param(getattr(m, attr).detach()[keep], getattr(m, attr)))
            for attr in ("running_mean", "running_var"):
                if getattr(m, attr) is not None:
                    undo.set(m, attr, getattr(m, attr)[keep].clone())
            undo.set(m, "num_features", len(keep))
        elif isinstance(m, nn.Conv2d) and (name, "dw") in gone:
            keep = _keep(m.out_channels, gone[(name, "dw")])
            undo.set(m, "weight", _param(m.weight.detach()[keep], m.weight))
            if m.bias is not None:
                undo.set(m, "bias", _param(m.bias.detach()[keep], m.bias))
            for attr in ("in_channels", "out_channels", "groups"):
                undo.set(m, attr, len(keep))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            conv = isinstance(m, nn.Conv2d)
            keep_out = _keep(m.weight.shape[0], out_r)
            keep_in = _keep(m.weight.shape[1], in_r)
            undo.set(m, "weight", _param(m.weight.detach()[keep_out][:, keep_in], m.weight))
            if m.bias is not None and out_r:
                undo.set(m, "bias", _param(m.bias.detach()[keep_out], m.bias))
            undo.set(m, "out_channels" if conv else "out_features", len(keep_out))
            undo.set(m, "in_channels" if conv else "in_features", len(keep_in))
        else:
            raise ValueError(f"{name}: prunekit cannot resize a {type(m).__name__}")
