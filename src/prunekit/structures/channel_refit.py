"""Repairing the layers that read removed channels (``refine="lstsq"`` / ``"snows"``).

With the removed input columns of every consumer zeroed (which is what the narrower network
computes), each consumer is refit in execution order by exact least squares of its kept columns
(a conv's columns are its im2col columns, ``in_channel x kh x kw``) to the dense network's output
of that layer, on the inputs the already-repaired network feeds it. ``refine="snows"`` then
refits the kept columns against SNOWS's K-step lookahead loss (:func:`.snows.snows_structure`,
the whole model as one block: the layer's own output and the next K measured tensors, compared
with the same network holding this layer's dense weight and bias).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..oneshot.snows_options import SnowsOptions
from ..oneshot.solvers.columns import output_error, refit_columns
from .channel_scores import columns, span
from .channel_surgery import removed_positions
from .channels_graph import ChannelGraph
from .snows import prunable_ids, snows_structure
from .stats import ConsumerStats
from .surgery import Undo
from .units import Structure


class _Stop(Exception):
    """Raised by a hook once the input it waits for has been seen: the rest of the forward is skipped."""


def layer_input(model: nn.Module, module: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    """The input ``module`` receives when ``model`` runs one batch (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(_m, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(*call[0], **call[1])
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("a consumer was not called by the model's forward")
    return seen[0]


def check_consumers(model: nn.Module, names: list[str]) -> None:
    """A ValueError for a consumer the im2col refit cannot express (string or non-zero padding)."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            raise ValueError(f"{name}: refine='lstsq'/'snows' and score='wanda'/'obs' read im2col columns, which "
                             f"need zero padding given as numbers (got padding={m.padding!r}, padding_mode="
                             f"{m.padding_mode!r}); use refine=None with score='l2' or 'bn'")


def _param(t: torch.Tensor, like: nn.Parameter, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(t.reshape(like.shape).to(like.dtype), requires_grad=requires_grad)


def kind_columns(module: nn.Module) -> torch.Tensor:
    """Where each channel-major column (``in_channel x kh x kw``, as :func:`.channel_scores.columns`
    orders them) sits in the layer kind's matrix (position-major for a conv: ``kh x kw x
    in_channel``), which :func:`.snows.snows_structure` indexes."""
    if not isinstance(module, nn.Conv2d):
        return torch.arange(module.weight.shape[1])
    k, c = span(module), module.weight.shape[1]
    j = torch.arange(c * k)
    return (j % k) * c + j // k


def refit(model, dense, name: str, gone: set[int], calls, damp: float, undo: Undo,
          snows: tuple[SnowsOptions, set[int]] | None = None) -> tuple[float, float]:
    """Refit one consumer's kept columns (``gone``: its removed matrix columns) to the dense
    network's output of that layer; then, with ``snows``, by the lookahead. Returns the layer's
    output error (mean squared, summed over outputs) dropped vs refit."""
    m, t = dict(model.named_modules())[name], dict(dense.named_modules())[name]
    grad_w = m.weight.requires_grad
    grad_b = m.bias.requires_grad if m.bias is not None else False
    w = t.weight.detach().double().reshape(t.weight.shape[0], -1)
    keep = torch.tensor(sorted(set(range(w.shape[1])) - gone), dtype=torch.long)
    stats = ConsumerStats(w.shape[1], dense=True)
    for call in calls:
        stats.add(columns(m, layer_input(model, m, call)).double(), columns(t, layer_input(dense, t, call)).double())
    b = None if t.bias is None else t.bias.detach().double()
    kw = dict(cross=stats.cross, mean_s=stats.mean_s, mean_t=stats.mean_t, bias=b)
    if snows is not None and snows[0].warm_start == "none":
        new_w, new_b = w[:, keep], b
    else:
        new_w, new_b = refit_columns(w, keep, stats.hessian, fit_bias=b is not None, damp=damp, **kw)
    if snows is not None:
        options, targets = snows
        undo.set(m, "weight", _param(t.weight.detach(), m.weight, grad_w))  # D: this layer's dense weight
        if b is not None:
            undo.set(m, "bias", _param(t.bias.detach(), m.bias, grad_b))
        s = Structure("channels", name, (), name, 0)
        new_w, _ = snows_structure(model, s, kind_columns(m)[keep], new_w, None if new_b is b else new_b,
                                   [("", model)], calls, options, targets, undo)
        new_b = None if m.bias is None else m.bias.detach().double()
    if not torch.isfinite(new_w).all():
        raise ValueError(f"{name}: the refit produced non-finite weights; raise damp= or use refine=None")
    err_drop = output_error(w, keep, w[:, keep], stats.hessian, target_gram=stats.target_gram, new_bias=b, **kw)
    err_fit = output_error(w, keep, new_w, stats.hessian, target_gram=stats.target_gram, new_bias=new_b, **kw)
    full = torch.zeros_like(w)
    full[:, keep] = new_w.double()
    undo.set(m, "weight", _param(full, m.weight, grad_w))
    if b is not None:
        undo.set(m, "bias", _param(new_b, m.bias, grad_b))
    return err_drop, err_fit


def mask(model: nn.Module, name: str, gone: set[int], undo: Undo) -> None:
    """Zero a consumer's input columns of removed channels (the pruned network, before surgery)."""
    m = dict(model.named_modules())[name]
    w = m.weight.detach().reshape(m.weight.shape[0], -1).clone()
    w[:, sorted(gone)] = 0
    undo.set(m, "weight", nn.Parameter(w.reshape(m.weight.shape), requires_grad=m.weight.requires_grad))


def gone_columns(model: nn.Module, graph: ChannelGraph, removed: dict[int, list[int]]) -> dict[str, set[int]]:
    """consumer -> its matrix columns of the removed channels (``kh * kw`` per conv position)."""
    modules = dict(model.named_modules())
    out = {}
    for (name, role), positions in removed_positions(graph, removed).items():
        if role == "in":
            k = span(modules[name])
            out[name] = {p * k + j for p in positions for j in range(k)}
    return out


def repair(model: nn.Module, graph: ChannelGraph, removed: dict[int, list[int]], calls, damp: float, undo: Undo,
           refits: dict[str, tuple[float, float]], snows: SnowsOptions | None = None) -> None:
    """Mask every consumer's removed inputs, then refit the consumers in execution order."""
    dense = copy.deepcopy(model)
    gone = gone_columns(model, graph, removed)
    for name, cols in gone.items():
        mask(model, name, cols, undo)
    lookahead = None if snows is None else (snows, prunable_ids(model))
    for name in graph.layers:  # execution order
        if name in gone:
            refits[name] = refit(model, dense, name, gone[name], calls, damp, undo, lookahead)
