"""The layer kind of fused mixture-of-experts weights (transformers 5's Mixtral, Qwen2-MoE, ...).

transformers 5 stores a layer's experts as two 3-D parameters, expert first:
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``; expert ``e`` computes
``down_proj[e] @ (act(gate) * up)`` with ``gate, up = (gate_up_proj[e] @ x).chunk(2)`` on the tokens
routed to it, and the layer adds that output times the token's routing weight ``g_e(t)``.

Matched by layout, not by class name (:class:`FusedExperts`): any module with those two
parameters (consistent shapes), a ``forward`` taking ``top_k_index`` and ``top_k_weights``, an
``act_fn`` or ``_apply_gate``, and none of transformers' flags for a transposed, biased,
interleaved or gateless layout (``is_transposed``, ``has_bias``, ``is_concatenated=False``,
``has_gate=False``: those stay gaps, reported by :mod:`prunekit.oneshot.coverage`). The
"experts implementation" transformers dispatches the forward to (eager, grouped_mm, ...) does not
matter: only the call's arguments are read. Older code's per-expert ``nn.Linear`` modules need no
kind of their own: each is a Linear layer whose hook sees only its expert's tokens.

Units, each a ``[d_out, d_in]`` view of one expert: ``gate_up_proj[e]`` ``[2I, H]`` (first stage)
and ``down_proj[e]`` ``[H, I]`` (second stage). Their input rows are the tokens routed to expert
``e`` only: ``gate_up_proj[e]`` reads ``g_e(t) x_t`` and ``down_proj[e]`` reads
``g_e(t) (act(gate) * up)(x_t)``, recomputed from the captured call with the current
``gate_up_proj[e]`` (pruned already when the statistics are sequential).

Why the rows are scaled by the routing weight: the layer's output is ``sum_e g_e(t) f_e(x_t)``,
so an error ``dW a_t`` in ``down_proj[e]`` reaches the output as ``g_e(t) dW a_t = dW (g_e(t) a_t)``:
with scaled rows, the layer-wise loss the methods minimise (and Wanda's column norms) is exactly
the expert's share of the layer's output error, a token that gives the expert little weight
counting little (MoE-Pruner, Xie et al. 2024, weights Wanda's score by the router the same way).
For ``gate_up_proj[e]`` the error passes through ``act`` and ``down_proj[e]`` before the same
factor, so the same weighting is its first-order share. (Per-expert ``nn.Linear`` modules of
older code are hooked directly and see unscaled rows.)

With a dense target (least squares, SNOWS), the target path runs the same tokens: inside
:func:`prunekit.layers.base.pairing`, the dense twin of a call takes the pruned path's routing,
each row then scaled by the dense path's own weight ``g_e(t)`` (0 where the dense path routes the
token elsewhere), so both paths pair row by row and the fit is to the expert's dense contribution
on the tokens whose output the pruned expert changes. An experts module must be
called once per block forward for that pairing (transformers' are).

An expert no calibration token reaches gets no rows: :mod:`prunekit.oneshot.pipeline` prunes its
units by magnitude and reports them, or ``strict=True`` refuses.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import LayerKind, in_paired_call, pairing_memo

_PARAMS = ("gate_up_proj", "down_proj")
_UNIT = re.compile(r"^(gate_up_proj|down_proj)\[(\d+)\]$")
ROUTING_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


@functools.lru_cache(maxsize=None)
def _routed_forward(cls: type) -> bool:
    """Whether ``cls.forward`` takes the routing arguments (transformers' decorator wraps the
    forward with ``functools.wraps``, so the signature is the original's)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return all(a in params for a in ROUTING_ARGS[1:])


def fused_layout(module: object) -> bool:
    """Whether ``module`` holds fused experts this kind reads (see the module's docstring)."""
    if not isinstance(module, nn.Module) or not _routed_forward(type(module)):
        return False
    gate_up, down = (module._parameters.get(n) for n in _PARAMS)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return False
    e, two_i, h = gate_up.shape
    if down.shape != (e, h, two_i // 2) or two_i % 2:
        return False
    flags = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True}
    if any(getattr(module, f, default) != default for f, default in flags.items()):
        return False
    return callable(getattr(module, "_apply_gate", None)) or callable(getattr(module, "act_fn", None))


class _LayoutMeta(type):
    """``isinstance(m, FusedExperts)`` asks :func:`fused_layout`; ``issubclass(C, FusedExperts)``
    whether ``C.forward`` takes the routing (what ``types=`` can check without an instance)."""

    def __instancecheck__(cls, instance: object) -> bool:
        return fused_layout(instance)

    def __subclasscheck__(cls, subclass: type) -> bool:
        if type.__subclasscheck__(cls, subclass):
            return True
        return isinstance(subclass, type) and issubclass(subclass, nn.Module) and _routed_forward(subclass)


class FusedExperts(nn.Module, metaclass=_LayoutMeta):
    """The type of every fused experts module, by layout (never instantiated): what the layer
    kind ``"fused-experts"`` handles, and what ``types=`` names to prune experts alone."""


def routing(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` of one call of ``module``."""
    values = list(args[:3]) + [kwargs[a] for a in ROUTING_ARGS[len(args):] if a in kwargs]
    if len(values) < 3 or not all(torch.is_tensor(v) for v in values):
        raise TypeError(f"experts module {type(module).__name__} was not called as "
                        "experts(hidden_states, top_k_index, top_k_weights); its routing cannot be read")
    hidden, index, weights = values
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, index.reshape(hidden.shape[0], -1).long(), weights.reshape(hidden.shape[0], -1)


def _parse(unit: str) -> tuple[str, int]:
    match = _UNIT.match(unit)
    if match is None:
        raise ValueError(f"unknown unit {unit!r} of fused experts (expected gate_up_proj[e] or down_proj[e])")
    return match.group(1), int(match.group(2))


class FusedExpertsKind(LayerKind):
    """Fused 3-D experts: ``gate_up_proj[e]`` then ``down_proj[e]`` per expert, each read on the
    tokens routed to ``e`` scaled by their routing weights (see the module's docstring)."""

    name = "fused-experts"
    types = (FusedExperts,)

    def units(self, module: nn.Module) -> tuple[str, ...]:
        return tuple(u for stage in self.stages(module) for u in stage)

    def stages(self, module: nn.Module) -> tuple[tuple[str, ...], ...]:
        count = module.gate_up_proj.shape[0]
        return tuple(tuple(f"{p}[{e}]" for e in range(count)) for p in _PARAMS)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {p: getattr(module, p) for p in _PARAMS}

    def parameter(self, module: nn.Module, unit: str = "") -> nn.Parameter:
        return getattr(module, _parse(unit)[0])

    def shape(self, module: nn.Module, unit: str = "") -> tuple[int, ...]:
        return tuple(self.matrix(module, unit).shape)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        name, e = _parse(unit)
        return getattr(module, name).detach()[e]

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        name, e = _parse(unit)
        out = torch.zeros(getattr(module, name).shape, dtype=torch.bool, device=mask.device)
        out[e] = mask
        return out

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        name, e = _parse(unit)
        param = getattr(module, name)
        param[e] = matrix.to(device=param.device, dtype=param.dtype)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        return self.unit_inputs(module, args, {}, (unit,))[unit]

    def unit_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
        _, index, _ = routing(module, args, kwargs)
        count = module.gate_up_proj.shape[0]
        index = index[(index >= 0) & (index < count)]
        per = torch.bincount(index.reshape(-1).cpu(), minlength=count).tolist()
        return {f"{p}[{e}]": per[e] for p in _PARAMS for e in range(count)}

    @torch.no_grad()
    def unit_inputs(self, module: nn.Module, args: tuple, kwargs: dict, units: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden, index, weights = routing(module, args, kwargs)
        count = module.gate_up_proj.shape[0]
        chosen, memo = index, pairing_memo()
        if memo is not None and in_paired_call():  # the dense twin: the pruned path's tokens, its own weights
            noted = memo.get(module)
            if noted is not None and noted.shape == index.shape:
                chosen = noted.to(index.device)
        elif memo is not None:
            memo[module] = index
        # g[t, e]: this call's routing weight of expert e for token t (0: not chosen; column E
        # collects expert-parallel sentinels)
        g = torch.zeros(hidden.shape[0], count + 1, dtype=weights.dtype, device=weights.device)
        g.scatter_add_(1, index.clamp(0, count).to(weights.device), weights)
        out: dict[str, torch.Tensor] = {}
        for unit in units:
            name, e = _parse(unit)
            tokens = (chosen == e).any(dim=1).nonzero().squeeze(1).to(hidden.device)
            x = hidden[tokens]
            scale = g[tokens.to(g.device), e].to(device=hidden.device, dtype=hidden.dtype).unsqueeze(1)
            if name == "down_proj":
                x = self._gated(module, F.linear(x, module.gate_up_proj[e]))
            out[unit] = x * scale
        return out

    @staticmethod
    def _gated(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up``: the module's own ``_apply_gate`` (transformers 5), else ``act_fn``."""
        apply = getattr(module, "_apply_gate", None)
        if callable(apply):
            return apply(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return module.act_fn(gate) * up
