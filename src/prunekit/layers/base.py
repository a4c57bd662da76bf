"""The registry of layer kinds: how a module type is seen by every one-shot method.

Every method works on ``[d_out, d_in]`` matrices whose columns line up with the columns of
the layer's unfolded input. A *kind* says, for one family of module types, which such matrices
("units") a module holds, how to read and write each, and how the module's forward arguments
become each unit's input rows. Linear and ungrouped convolutions hold one unit; a grouped
convolution holds one per group (``weight[g0]``, ...), ``nn.MultiheadAttention`` four (the q,
k and v row blocks of ``in_proj_weight`` and ``out_proj.weight``), each with its own inputs.
The kinds themselves live one per file beside this one, and ``prunekit.layers`` registers them;
kinds of optional libraries (transformers' ``Conv1D``) are registered with :func:`register_when_imported`
and added once the library is imported: a model holding such a layer cannot exist before.
"""
from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..sparsity.layout import from_matrix, to_matrix


class LayerKind:
    """Base of a layer kind; subclass, set ``name`` and ``types``, and register an instance.

    The defaults describe a module with one unit, its ``weight``, already ``[d_out, d_in]``
    or a convolution kernel (see :mod:`prunekit.sparsity.layout`)."""

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
        """Input rows of several units from one forward call (override to share work). Inside
        :func:`paired_call`, the rows must pair one to one with those of the previous call."""
        return {u: self.input_columns(module, args, u) for u in units}

    def unit_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, int] | None:
        """How many input rows each unit gets from one forward call, when a unit can get none
        (an expert no token is routed to); None: every unit reads every row of the call."""
        return None


_PAIRING: ContextVar[dict | None] = ContextVar("prunekit_pairing", default=None)
_PAIRED: ContextVar[bool] = ContextVar("prunekit_paired_call", default=False)


@contextlib.contextmanager
def pairing() -> Iterator[None]:
    """The calls inside are one call on the pruned path and then, inside :func:`paired_call`, its
    dense twin (the statistics' target path). A kind whose units read a data-dependent subset of
    the rows (the tokens routed to an expert) notes its choice in :func:`pairing_memo` on the
    first and takes it on the twin, so the rows of both paths pair; the notes end with the block."""
    token = _PAIRING.set({})
    try:
        yield
    finally:
        _PAIRING.reset(token)


@contextlib.contextmanager
def paired_call() -> Iterator[None]:
    """Mark the forward calls inside as the dense twins of the calls just made (see :func:`pairing`)."""
    token = _PAIRED.set(True)
    try:
        yield
    finally:
        _PAIRED.reset(token)


def pairing_memo() -> dict | None:
    """The notes of the current :func:`pairing` (keyed by module), None outside one."""
    return _PAIRING.get()


def in_paired_call() -> bool:
    """Whether the current forward is a dense twin (see :func:`paired_call`)."""
    return _PAIRED.get()


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


_DEFERRED: dict[str, tuple[str, Callable[[], LayerKind]]] = {}


def register_when_imported(name: str, module: str, make: Callable[[], LayerKind]) -> None:
    """Register ``make()`` as the kind ``name`` once the module ``module`` (an optional library,
    e.g. ``transformers.pytorch_utils``) has been imported by someone else; never imports it."""
    _DEFERRED[name] = (module, make)


def _deferred_kinds() -> None:
    for name, (module, make) in list(_DEFERRED.items()):
        if name not in _KINDS and module in sys.modules:
            register_kind(make())


def kinds() -> tuple[LayerKind, ...]:
    _deferred_kinds()
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
                             "(prunekit.layers.register_kind adds one)")


def known() -> str:
    return ", ".join(f"{k.name} ({'/'.join(t.__name__ for t in k.types)})" for k in kinds())


def unit_name(module_name: str, unit: str) -> str:
    """How a unit is named in budgets, overrides and reports: ``encoder.0.self_attn.in_proj_weight[q]``."""
    return ".".join(p for p in (module_name, unit) if p)


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``[N, d_in]`` in the column order of
    :func:`prunekit.sparsity.layout.to_matrix` (the rule of the module's layer kind)."""
    try:
        kind = kind_of(module)
    except TypeError as exc:
        raise TypeError(f"unsupported layer type {type(module).__name__}") from exc
    return kind.input_columns(module, (x,))
