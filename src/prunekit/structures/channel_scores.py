"""Which channels of a group go: one score per channel, lowest removed first.

``l2``: the squared norm of the group's producer rows (conv filters, Linear rows, a head's q/k/v
rows); ``bn``: BatchNorm ``|gamma|``; ``wanda``: the consumers' columns' ``||W[:, j]||^2 E[x_j^2]``
on the dense network; ``obs``: second order, greedy. For ``obs`` every consumer of the group
holds an :class:`~prunekit.oneshot.solvers.columns.ObsState` (its matrix and inverse Hessian of
its input columns on the dense network, as SparseGPT and ``prune_structured(method="obs")``
use them); removing a channel costs the sum over its consumers of ``tr(W_c (Hinv_cc)^-1 W_c^T)``
(``c``: the channel's columns there, ``kh * kw`` per position for a conv), the cheapest goes, each
consumer's remaining columns are updated, and the next is priced on the updated states. A
consumer read by two groups (a concatenation) keeps one state across both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..oneshot.solvers.columns import ObsState
from .channels_graph import ChannelGroup, Member
from .stats import ConsumerStats

SCORES = ("l2", "bn", "wanda", "obs")
OBS_DAMP = 0.01  # SparseGPT's damping of H before inverting it (as prune_structured)
OBS_MAX_COLUMNS = 16384  # a consumer wider than this would hold a Hessian over 2 GiB (float64) for OBS


def check_obs(model: nn.Module, consumers: list[str]) -> None:
    """A ValueError naming a consumer too wide for OBS's ``d_in x d_in`` float64 Hessian."""
    modules = dict(model.named_modules())
    for name in consumers:
        w = modules[name].weight
        d_in = w.numel() // w.shape[0]
        if d_in > OBS_MAX_COLUMNS:
            raise ValueError(f"{name}: score='obs' would hold a {d_in} x {d_in} float64 Hessian "
                             f"({d_in * d_in * 8 / 2 ** 30:.1f} GiB) for its input columns; use score='wanda', or "
                             f"exclude it (exclude=[{name!r}])")


def columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its matrix's columns: a conv's im2col rows
    (``F.unfold``: ``in_channel x kh x kw``, channel-major like ``weight.reshape(out, -1)``); a
    Linear's input with every leading axis (batch, tokens) as rows."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def span(module: nn.Module) -> int:
    """Matrix columns per input position: ``kh * kw`` for a conv, 1 for a Linear."""
    return module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1


def member_columns(member: Member, module: nn.Module) -> torch.Tensor:
    """``[count, k * span]``: the matrix columns of each of the group's channels in a consumer."""
    k = span(module)
    return (member.index.unsqueeze(-1) * k + torch.arange(k)).reshape(member.index.shape[0], -1)


def input_stats(model: nn.Module, consumers: list[str], calls, full: bool) -> dict[str, torch.Tensor | ConsumerStats]:
    """One pass of the dense network: per consumer, ``E[x_j^2]`` of every column, or with ``full``
    the :class:`ConsumerStats` (``H = X^T X / N``) that OBS needs."""
    modules = dict(model.named_modules())
    stats: dict[str, list] = {n: [None, 0] for n in consumers}
    handles = []

    def hook(name):
        def f(m, args):
            u = columns(m, args[0].detach()).double()
            if full:
                if stats[name][0] is None:
                    stats[name][0] = ConsumerStats(u.shape[1], dense=False)
                stats[name][0].add(u)
            else:
                stats[name][0] = (0 if stats[name][0] is None else stats[name][0]) + u.pow(2).sum(0)
                stats[name][1] += u.shape[0]
        return f

    for name in consumers:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        for args, kwargs in calls:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, (s, _) in stats.items() if s is None]
    if missing:
        raise ValueError(f"{missing[0]} was not called by the model's forward; its channels cannot be scored")
    return {n: s if full else s / rows for n, (s, rows) in stats.items()}


def channel_scores(model: nn.Module, group: ChannelGroup, score: str, stats: dict) -> torch.Tensor:
    """One float64 score per channel of ``group`` (``obs``: each channel's cost alone, on the
    dense states: what a global budget ranks)."""
    modules = dict(model.named_modules())
    total = torch.zeros(group.count, dtype=torch.float64)
    for m in group.members:
        mod = modules[m.module]
        if score == "l2" and m.role in ("out", "heads"):
            w = mod.in_proj_weight if m.role == "heads" else mod.weight
            rows = w.detach().double().reshape(w.shape[0], -1).pow(2).sum(1)
            total += rows[m.index].sum(1)
        elif score == "bn" and m.role == "bn":
            total += mod.weight.detach().double().abs()[m.index].sum(1)
        elif score == "wanda" and m.role == "in":
            cols = mod.weight.detach().double().reshape(mod.weight.shape[0], -1).pow(2).sum(0) * stats[m.module]
            total += cols[member_columns(m, mod)].sum(1)
        elif score == "obs" and m.role == "in":
            total += stats[m.module].costs(member_columns(m, mod))
    return total


def obs_states(model: nn.Module, stats: dict[str, ConsumerStats]) -> dict[str, ObsState]:
    """A fresh OBS state (dense matrix, inverse damped Hessian) for every consumer."""
    modules = dict(model.named_modules())
    return {n: ObsState(modules[n].weight.detach().reshape(modules[n].weight.shape[0], -1), s.hessian, OBS_DAMP)
            for n, s in stats.items()}


def obs_choose(model: nn.Module, group: ChannelGroup, count: int, states: dict[str, ObsState]) -> list[int]:
    """Greedily remove ``count`` channels of ``group`` by their summed OBS cost, updating every
    consumer's state (ties towards the lower channel)."""
    modules = dict(model.named_modules())
    parts = [(states[m.module], member_columns(m, modules[m.module])) for m in group.consumers]
    alive = torch.ones(group.count, dtype=torch.bool)
    removed = []
    for _ in range(count):
        idx = torch.nonzero(alive)[:, 0]
        cost = sum(state.costs(cols[idx]) for state, cols in parts)
        best = int(idx[int(torch.argmin(cost))])
        for state, cols in parts:
            state.remove(cols[best])
        alive[best] = False
        removed.append(best)
    return sorted(removed)


def lowest(values: torch.Tensor, count: int) -> list[int]:
    """The ``count`` channels of lowest score, ties towards the lower index."""
    order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    return sorted(order[:count])
