"""The registry of layer kinds: how a module type is seen by every one-shot method.

Every method works on ``[d_out, d_in]`` matrices whose columns line up with the columns of
the layer's unfolded input. A *kind* says, for one family of module types, which such matrices
("units") a module holds, how to read and write each, and how the module's forward arguments
become each unit's input rows. Linear and ungrouped convolutions hold one unit; a grouped
convolution holds one per group (``weight[g0]``, ...), ``nn.MultiheadAttention`` four (the q,
k and v row blocks of ``in_proj_weight`` and ``out_proj.weight``), each with its own inputs.
Kinds of optional libraries (transformers' ``Conv1D``) are registered once the library is
imported: a model holding such a layer cannot exist before.
"""
from __future__ import annotations

import sys
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layout import from_matrix, to_matrix


class LayerKind:
    """Base of a layer kind; subclass, set ``name`` and ``types``, and register an instance.

    The defaults describe a module with one unit, its ``weight``, already ``[d_out, d_in]``
    or a convolution kernel (see :mod:`prunekit.layout`)."""

    name: ClassVar[str]
    types: ClassVar[tuple[type[nn.Module], ...]]

    def why_not(self, module: nn.Module) -> str | None:
        """Why this module cannot be pruned (None: it can)."""
        return None

    def units(self, module: nn.Module) -> tuple[str, ...]:
        """Names of the module's ``[d_out, d_in]`` matrices ("" for the single weight)."""
        return ("",)

    def stages(self, module: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The units in calibration order: a unit's inputs may depend on the units of earlier
        stages (attention's ``out_proj`` reads what q, k and v produce), never on its own stage's."""
        return (self.units(module),)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """Every parameter the kind writes, by its name in ``module`` (the restore point)."""
        return {"weight": module.weight}

    def parameter(self, module: nn.Module, unit: str = "") -> nn.Parameter:
        """The parameter the unit lives in."""
        return module.weight

    def shape(self, module: nn.Module, unit: str = "") -> tuple[int, ...]:
        """The unit's shape as stored (what reports show and ERK budgets read)."""
        return tuple(module.weight.shape)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        """The unit's ``[d_out, d_in]`` matrix (a view or a copy: never write into it)."""
        return to_matrix(module.weight.detach())

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        """A ``[d_out, d_in]`` keep-mask of the unit laid out like the parameter it lives in
        (False outside the unit)."""
        return from_matrix(mask, module.weight.shape)

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        """Write a ``[d_out, d_in]`` matrix back into the unit, in place (dtype of the weight)."""
        module.weight.copy_(from_matrix(matrix.to(module.weight.dtype), module.weight.shape))

    def nm_why_not(self, module: nn.Module, unit: str, m: int) -> str | None:
        """Why the unit cannot hold N:M groups of ``m`` consecutive input columns (None: it can)."""
        d_in = self.matrix(module, unit).shape[1]
        return None if d_in % m == 0 else f"input dimension {d_in} is not a multiple of {m}"

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        """The unit's input rows ``[N, d_in]`` from the module's forward arguments."""
        raise NotImplementedError

    def unit_inputs(self, module: nn.Module, args: tuple, kwargs: dict, units: Sequence[str]) -> dict[str, torch.Tensor]:
        """Input rows of several units from one forward call (override to share work)."""
        return {u: self.input_columns(module, args, u) for u in units}


class LinearKind(LayerKind):
    """``nn.Linear``: the weight is the matrix; every leading position (token) is a row."""

    name = "linear"
    types = (nn.Linear,)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        x = args[0]
        return x.reshape(-1, x.shape[-1])


class ConvKind(LayerKind):
    """``nn.Conv1d`` / ``nn.Conv2d``: columns ordered (kernel position, input channel), so M
    consecutive columns are M input channels at one position (the N:M convention of NVIDIA's
    2:4); every output position of every image is a row (im2col), unfolded per call so the
    calibration set is never materialised at once. A grouped convolution is one unit per group
    (``weight[g0]``, ...): group g's output channels read only its own input channels, so each
    group is a ``[C_out/g, k * C_in/g]`` problem with its own Hessian."""

    name = "conv"
    types = (nn.Conv1d, nn.Conv2d)

    def units(self, module: nn.Module) -> tuple[str, ...]:
        return ("",) if module.groups == 1 else tuple(f"weight[g{g}]" for g in range(module.groups))

    def _rows(self, module: nn.Module, unit: str) -> slice:
        if not unit:
            return slice(None)
        g, per = int(unit[len("weight[g"):-1]), module.out_channels // module.groups
        return slice(g * per, (g + 1) * per)

    def shape(self, module: nn.Module, unit: str = "") -> tuple[int, ...]:
        return tuple(module.weight[self._rows(module, unit)].shape)

    def matrix(self, module: nn.Module, unit: str = "") -> torch.Tensor:
        return to_matrix(module.weight.detach()[self._rows(module, unit)])

    def weight_mask(self, module: nn.Module, mask: torch.Tensor, unit: str = "") -> torch.Tensor:
        rows = self._rows(module, unit)
        out = torch.zeros(module.weight.shape, dtype=torch.bool, device=mask.device)
        out[rows] = from_matrix(mask, out[rows].shape)
        return out

    @torch.no_grad()
    def write(self, module: nn.Module, matrix: torch.Tensor, unit: str = "") -> None:
        block = module.weight[self._rows(module, unit)]
        block.copy_(from_matrix(matrix.to(module.weight.dtype), block.shape))

    def nm_why_not(self, module: nn.Module, unit: str, m: int) -> str | None:
        per = module.in_channels // module.groups
        if per == 1 and module.groups > 1:
            return ("depthwise kernel: one input channel per group, so no N:M group along input channels "
                    "exists; prune it unstructured or exclude it")
        if module.groups == 1:  # groups of M consecutive (position, channel) columns, as for Linear
            return super().nm_why_not(module, unit, m)
        if per % m:
            return (f"{per} input channels per group is not a multiple of {m} "
                    "(N:M runs along each group's input channels at one kernel position)")
        return None

    def _unfold(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, k, C_in]``: every output position's receptive field."""
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-1)
            ks, st, pd, dl = (module.kernel_size[0], 1), (module.stride[0], 1), (module.padding[0], 0), (module.dilation[0], 1)
        else:
            ks, st, pd, dl = module.kernel_size, module.stride, module.padding, module.dilation
        if isinstance(pd, str) and pd != "valid":
            raise NotImplementedError(f"padding={pd!r} is not supported for calibration (give the padding as numbers)")
        pd = (0,) * len(ks) if isinstance(pd, str) else tuple(pd)
        if module.padding_mode != "zeros" and any(pd):
            x = F.pad(x, [p for p in reversed(pd) for _ in range(2)], mode=module.padding_mode)
            pd = (0,) * len(pd)
        cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st)  # [B, C_in*k, L], C_in slowest
        b, _, length = cols.shape
        c_in = x.shape[1]
        return cols.view(b, c_in, cols.shape[1] // c_in, length).permute(0, 3, 2, 1)

    def input_columns(self, module: nn.Module, args: tuple, unit: str = "") -> torch.Tensor:
        return self.unit_inputs(module, args, {}, (unit,))[unit]

    def unit_inputs(self, module: nn.Module, args: tuple, kwargs: dict, units: Sequence[str]) -> dict[str, torch.Tensor]:
        cols = self._unfold(module, args[0])
        b, length, k, c_in = cols.shape
        per = c_in // module.groups
        out = {}
        for unit in units:
            g = int(unit[len("weight[g"):-1]) if unit else 0
            part = cols if not unit else cols[..., g * per:(g + 1) * per]
            out[unit] = part.reshape(b * length, k * part.shape[-1])
        return out


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


def _optional_kinds() -> None:
    """Register the kinds of optional libraries already imported (never imports them)."""
    if "hf-conv1d" not in _KINDS and "transformers.pytorch_utils" in sys.modules:
        from .hf_kinds import HFConv1DKind

        register_kind(HFConv1DKind())


def kinds() -> tuple[LayerKind, ...]:
    _optional_kinds()
    return tuple(_KINDS.values())


def prunable_types() -> tuple[type[nn.Module], ...]:
    """Every module type some kind handles (subclasses included)."""
    return tuple(t for k in kinds() for t in k.types)


def kind_of(module: nn.Module) -> LayerKind:
    """The kind of ``module`` (the most specific type wins); TypeError naming the known kinds."""
    best, depth = None, -1
    for kind in kinds():
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
    return ", ".join(f"{k.name} ({'/'.join(t.__name__ for t in k.types)})" for k in kinds())


def unit_name(module_name: str, unit: str) -> str:
    """How a unit is named in budgets, overrides and reports: ``encoder.0.self_attn.in_proj_weight[q]``."""
    return ".".join(p for p in (module_name, unit) if p)


register_kind(LinearKind())
register_kind(ConvKind())

from .attention_kind import MultiheadAttentionKind  # noqa: E402  (it builds on LayerKind above)

register_kind(MultiheadAttentionKind())
