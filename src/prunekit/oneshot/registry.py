"""The registry of one-shot methods: what ``prune(method=..., refine=...)`` can name.

One-shot pruning is two separate steps (Frantar & Alistarh 2023 choose the support and update
the weights in one pass; Lucas & Mazumder 2025 refit any given support), named as in
``prune()``: a :class:`Method` (role ``"method"``) chooses each layer's keep-mask, possibly
updating the kept weights (magnitude, Wanda, SparseGPT); a :class:`Refine` (role ``"refine"``)
refits the surviving weights on that fixed mask (least squares, SNOWS). Each is a small class
registered by name::

    @register
    class MyScore(Method):
        name = "my-score"
        needs = frozenset({"col_norms"})
        def choose(self, problem): ...

declaring the calibration statistics it needs (see :data:`STATISTICS`) and an ``Options``
dataclass that validates its own fields. ``prune()``, recipes, the command line, the demo and
the docs' method table all read this registry.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..sparsity.patterns import Pattern
from .stats import LayerStats

#: what a method can ask of the calibration pass, per layer:
#: ``col_norms`` -- per-input-column sums of squares (Wanda); ``hessian`` -- ``X^T X / N``;
#: ``dense_target`` -- cross terms ``X_s^T X_t / N`` with the inputs the dense block would
#: see (statistics are then recomputed after every layer); ``sequential`` -- the block's stored
#: inputs and the model, to evaluate losses through later layers (SNOWS).
STATISTICS = frozenset({"col_norms", "hessian", "dense_target", "sequential"})
ROLES = ("method", "refine")


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


@dataclass
class LayerContext:
    """What a refine that evaluates the network (``needs`` ``sequential``) sees of its layer:
    the model, the blocks from this one to the end, the block's stored inputs, the block's
    pruned layers with their dense weights, how to read and write the layer's matrix, and the
    processes calibrating together (``ranks``, :mod:`prunekit.oneshot.runtime.ranks`; None: this one)."""

    model: nn.Module
    layer: nn.Module
    chain: Sequence[tuple[str, nn.Module]]
    inputs: list[tuple[tuple, dict]]
    targets: set[int]
    block_layers: dict[str, nn.Module]
    dense_weights: dict[str, torch.Tensor]
    write: Callable[[torch.Tensor, torch.Tensor], None]
    read: Callable[[], torch.Tensor]
    weight_mask: Callable[[torch.Tensor], torch.Tensor]
    progress: bool = False
    #: the parameter holding the layer's matrix, and its entries outside that matrix (None:
    #: none; e.g. the k and v rows of attention's ``in_proj_weight`` while q is refit)
    parameter: nn.Parameter | None = None
    frozen: torch.Tensor | None = None
    ranks: Any = None
    #: the shape of one sample of the model's first calibration tensor (e.g. ``(3, 224, 224)``)
    model_input: tuple[int, ...] | None = None


@dataclass
class LayerProblem:
    """One layer as every method sees it: ``weight`` is the dense ``[d_out, d_in]`` matrix (a
    copy, on the execution device, in the statistics precision: float32 unless ``stats_dtype``
    or a float64 model says float64; solvers work in its dtype), ``stats`` the statistics the
    methods asked for (None without data); ``exact``: a method must not zero the
    kept weights of dead inputs (:mod:`prunekit.oneshot.dead`)."""

    name: str
    weight: torch.Tensor
    sparsity: float
    pattern: Pattern
    stats: LayerStats | None
    method: "Method"
    context: LayerContext | None = None
    #: keep the requested count of non-zeros: weights of dead inputs stay dense where kept
    exact: bool = True


@dataclass
class Update:
    """A step's answer: the new ``[d_out, d_in]`` matrix, and from a method its keep-mask;
    ``note`` goes to the layer's report, ``lookahead`` is a (before, after) loss pair."""

    weight: torch.Tensor
    mask: torch.Tensor | None = None
    note: str = ""
    lookahead: tuple[float, float] | None = None


class OneShotStep:
    """Base of the two steps of one-shot pruning; subclass :class:`Method` or :class:`Refine`."""

    name: ClassVar[str]
    role: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""

    def __init__(self, options: Any = None) -> None:
        self.options = make_options(type(self), options)

    def check(self, pattern: Pattern) -> None:
        """Refuse (ValueError) a pattern these options cannot serve, before any layer is touched."""


class Method(OneShotStep):
    """Chooses a layer's support (``prune(method=...)``). ``updates_weights``: the kept weights
    come back updated (SparseGPT), so a refine needs no warm start of its own."""

    role = "method"
    updates_weights: ClassVar[bool] = False

    def choose(self, problem: LayerProblem) -> Update:
        raise NotImplementedError


class Refine(OneShotStep):
    """Refits the surviving weights of a layer on the method's fixed mask (``prune(refine=...)``)."""

    role = "refine"

    def refine(self, problem: LayerProblem, chosen: Update) -> Update:
        raise NotImplementedError


#: the function each role implements
_WORK = {"method": "choose", "refine": "refine"}
_REGISTRY: dict[str, type[OneShotStep]] = {}


def register(cls: type[OneShotStep] | None = None, *, replace: bool = False) -> Any:
    """Class decorator: add a method or refine under its ``name`` (checked: a duplicate name, a missing
    declaration or an unknown statistic is a ``TypeError``). ``@register(replace=True)``
    redefines a name, e.g. when a notebook cell runs again."""
    if cls is None:
        return lambda c: register(c, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, (Method, Refine))):
        raise TypeError(f"register() takes a subclass of Method or Refine, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name or name in ("none", "null"):
        raise TypeError(f"{cls.__name__} must declare name = '...' (a non-empty string other than 'none')")
    if name in _REGISTRY and not replace:
        raise TypeError(f"a one-shot method named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                        "choose another name")
    work = _WORK[cls.role]
    if getattr(cls, work) is getattr(Method if cls.role == "method" else Refine, work):
        raise TypeError(f"{cls.__name__} must implement {work}()")
    needs = cls.needs
    if not isinstance(needs, (set, frozenset)) or not needs <= STATISTICS:
        raise TypeError(f"{cls.__name__}.needs must be a set drawn from {sorted(STATISTICS)}, got {needs!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass, got {cls.Options!r}")
    cls.needs = frozenset(needs)
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method or refine (for tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def names(role: str) -> tuple[str, ...]:
    """Registered names of one role (``"method"`` or ``"refine"``), in registration order."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return tuple(n for n, cls in _REGISTRY.items() if cls.role == role)


def get(name: str, role: str, where: str | None = None) -> type[OneShotStep]:
    """The class registered as ``name`` for ``role`` (ValueError naming ``where``, by default the
    role, with the closest name)."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or cls.role != role:
        known = names(role)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where or role} must be one of {', '.join(known)}, got {name!r}{hint}")
    return cls


def make_options(cls: type[OneShotStep], options: Any) -> Any:
    """``cls.Options`` from None, an instance, or a mapping of its fields (unknown key:
    ValueError naming the closest option)."""
    if options is None:
        options = {}
    if isinstance(options, cls.Options):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"{cls.name} options must be a mapping (e.g. a dict) or a {cls.Options.__name__}, "
                        f"got {type(options).__name__}")
    known = [f.name for f in dataclasses.fields(cls.Options)]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"known: {', '.join(known)}" if known else "it takes no options")
            raise ValueError(f"unknown {cls.name} option {key!r}; {hint}")
    try:
        return cls.Options(**options)
    except ValueError as exc:
        raise ValueError(f"{cls.name} option {exc}") from exc


def describe() -> list[dict[str, Any]]:
    """One row per registered method and refine (name, role, needs, options, summary): what ``--help``
    and the docs' method table show."""
    return [{"name": name, "role": cls.role, "needs": sorted(cls.needs),
             "options": [f.name for f in dataclasses.fields(cls.Options)], "summary": cls.summary}
            for name, cls in _REGISTRY.items()]


def load_plugins(modules: Sequence[str] | None) -> None:
    """Import user modules that register methods (``--plugin``, a recipe's ``prune.plugins``);
    a module not on the path is also looked for in the working folder."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module.split(".")[0] or os.getcwd() in sys.path:
                raise ValueError(f"plugin {module!r} cannot be imported ({exc}); put it on PYTHONPATH") from exc
            sys.path.insert(0, os.getcwd())
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as again:
                raise ValueError(f"plugin {module!r} cannot be imported ({again}); put it on PYTHONPATH "
                                 "or in the working folder") from again
            finally:
                sys.path.remove(os.getcwd())
