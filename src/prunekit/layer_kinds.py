"""The registry of layer kinds: how a module type is seen by every one-shot method.

Every method works on ``[d_out, d_in]`` matrices whose columns line up with the columns of
the layer's unfolded input. A *kind* says, for one family of module types, which such matrices
("units") a module holds, how to read and write each, and how the module's forward arguments
become each unit's input rows. Today each kind exposes one unit per module; the interface takes
several (e.g. the q, k and v row blocks of ``nn.MultiheadAttention.in_proj_weight``, or one
matrix per group of a grouped convolution), each with its own inputs.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .layout import from_matrix, to_matrix


class LayerKind:
    """Base of a layer kind; subclass, set ``name`` and ``types``, and register an instance."""

    name: ClassVar[str]
    types: ClassVar[tuple[type[nn.Module], ...]]

    def why_not(self, module: nn.Module) -> str | None:
        """Why this module cannot be pruned (None: it can)."""
        return None

    def units(self, module: nn.Module) -> tuple[str, ...]:
        """Names of the module's ``[d_out, d_in]`` matrices ("" for the single weight)."""
        return ("",)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        """The unit's ``[d_out, d_in]`` matrix (a view or a copy: never write into it)."""
        return to_matrix(module.weight.detach())

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        """A ``[d_out, d_in]`` keep-mask of the unit laid out like the parameter it lives in."""
        return from_matrix(mask, module.weight.shape)

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        """Write a ``[d_out, d_in]`` matrix back into the unit, in place (dtype of the weight)."""
        module.weight.copy_(from_matrix(matrix.to(module.weight.dtype), module.weight.shape))

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        """The unit's input rows ``[N, d_in]`` from the module's forward arguments."""
        raise NotImplementedError


class LinearKind(LayerKind):
    """``nn.Linear``: the weight is the matrix; every leading position (token) is a row."""

    name = "linear"
    types = (nn.Linear,)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        x = args[0]
        return x.reshape(-1, x.shape[-1])


class ConvKind(LayerKind):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups == 1``: columns ordered (kernel position,
    input channel), so M consecutive columns are M input channels at one position (the N:M
    convention of NVIDIA's 2:4); every output position of every image is a row (im2col),
    unfolded per call so the calibration set is never materialised at once."""

    name = "conv"
    types = (nn.Conv1d, nn.Conv2d)

    def why_not(self, module: nn.Module) -> str | None:
        return "grouped/depthwise convolution (not supported yet)" if module.groups != 1 else None

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        if module.groups != 1:
            raise NotImplementedError("grouped / depthwise convolutions need a per-group fit")
        if isinstance(module.padding, str):
            raise NotImplementedError("string padding ('same'/'valid') is not supported for calibration")
        x = args[0]
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-1)
            ks, st, pd, dl = (module.kernel_size[0], 1), (module.stride[0], 1), (module.padding[0], 0), (module.dilation[0], 1)
        else:
            ks, st, pd, dl = module.kernel_size, module.stride, tuple(module.padding), module.dilation
        if module.padding_mode != "zeros" and any(pd):
            x = F.pad(x, [p for p in reversed(pd) for _ in range(2)], mode=module.padding_mode)
            pd = (0,) * len(pd)
        cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st)  # [B, C_in*k, L], C_in slowest
        b, _, length = cols.shape
        c_in = x.shape[1]
        k = cols.shape[1] // c_in
        cols = cols.view(b, c_in, k, length).permute(0, 3, 2, 1)  # [B, L, k, C_in]
        return cols.reshape(b * length, k * c_in)


_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a kind (an instance); a duplicate name or a type another kind owns is a TypeError."""
    if not isinstance(kind, LayerKind) or not getattr(kind, "name", "") or not getattr(kind, "types", ()):
        raise TypeError(f"register_kind() takes a LayerKind instance with a name and types, got {kind!r}")
    if kind.name in _KINDS:
        raise TypeError(f"a layer kind named {kind.name!r} is already registered")
    owned = {t: k.name for k in _KINDS.values() for t in k.types}
    for t in kind.types:
        if t in owned:
            raise TypeError(f"{t.__name__} already belongs to the layer kind {owned[t]!r}")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (for tests and interactive sessions)."""
    _KINDS.pop(name, None)


def kinds() -> tuple[LayerKind, ...]:
    return tuple(_KINDS.values())


def prunable_types() -> tuple[type[nn.Module], ...]:
    """Every module type some kind handles (subclasses included): the default targets."""
    return tuple(t for k in _KINDS.values() for t in k.types)


def kind_of(module: nn.Module) -> LayerKind:
    """The kind of ``module`` (the most specific type wins); TypeError naming the known kinds."""
    best, depth = None, -1
    for kind in _KINDS.values():
        for t in kind.types:
            if isinstance(module, t) and len(t.__mro__) > depth:
                best, depth = kind, len(t.__mro__)
    if best is None:
        raise TypeError(f"no layer kind handles {type(module).__name__}; known kinds: {known()}")
    return best


def check_types(types) -> None:
    """ValueError when a type in ``types`` is not handled by any registered kind."""
    for t in types:
        if not (isinstance(t, type) and issubclass(t, prunable_types())):
            raise ValueError(f"types: no layer kind handles {getattr(t, '__name__', t)!r}; known kinds: {known()} "
                             "(prunekit.layer_kinds.register_kind adds one)")


def known() -> str:
    return ", ".join(f"{k.name} ({'/'.join(t.__name__ for t in k.types)})" for k in _KINDS.values())


register_kind(LinearKind())
register_kind(ConvKind())
