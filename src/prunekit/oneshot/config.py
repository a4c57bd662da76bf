"""``PruneConfig``: every option of one-shot pruning, with its default and its checks.

This is the one list of what :func:`prunekit.prune` accepts. Its keywords, a recipe's ``prune:``
section (:mod:`prunekit.jobs.recipe`) and the flags of ``prunekit prune``
(:mod:`prunekit.cli.prune_cmd`) are views of these fields: each view names the fields it leaves
out and why, and the tests check that every field is covered, so an option is added here, once.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..layers.base import check_types
from ..layers.targets import as_patterns
from ..sparsity.allocation import BUDGETS, check_sparsity
from ..sparsity.patterns import NM, Pattern, parse_pattern
from . import registry
from .options import check_int
from .runtime.placement import execution_device, stats_precision

CAPTURES = ("chain", "rerun")
STATS_DTYPES = ("float32", "float64")


def option(default: Any, help: str, **meta: Any) -> Any:
    """A field with its one-line ``help`` (what ``prunekit prune --help`` shows), where the
    accepted strings are fixed their ``choices``, and a ``metavar`` naming what a value is."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(kw_only=True)
class PruneConfig:
    """Every option of :func:`prunekit.prune`, with its default (``prune(**options)`` builds
    one). :meth:`validate` checks them all before any model is touched."""

    # -- what is removed, and how --------------------------------------------------------
    sparsity: float | None = option(
        None, "fraction of the prunable weights to remove, in [0, 1); required unless an N:M pattern implies it")
    pattern: str | Pattern = option(
        "unstructured", "'unstructured', or 'N:M' such as '2:4' (N kept in every M inputs: sparsity 1 - N/M)")
    method: str = option("magnitude", "how each layer's support is chosen (a registered method)")
    method_options: Mapping[str, Any] | None = option(
        None, "the method's options, checked by its Options class (e.g. block_size=64 for sparsegpt)")
    refine: str | None = option(
        None, "refits the surviving weights on the fixed support (a registered refine, or none)")
    refine_options: Mapping[str, Any] | None = option(
        None, "the refine's options, checked by its Options class (e.g. k=4, max_cg=20 for snows)")
    plugins: Sequence[str] | None = option(
        None, "modules imported first, which register more methods and refines (docs/extending.md)",
        metavar="MODULE")
    # -- how much each layer loses ---------------------------------------------------------
    budget: str = option("uniform", "how the sparsity is spread over the layers", choices=BUDGETS)
    cap: float | None = option(None, "the largest sparsity of any one layer under budget='global'")
    overrides: Mapping[str, float] | None = option(
        None, "fixed sparsities by layer-name regex (e.g. fc1=0.3); the budget spreads the rest",
        metavar="REGEX=SPARSITY")
    # -- which layers ------------------------------------------------------------------------
    include: str | Sequence[str] | None = option(
        None, "regexes of the layer names to prune (default: all)", metavar="REGEX")
    exclude: str | Sequence[str] | None = option(None, "regexes of the layer names to leave dense", metavar="REGEX")
    include_head: bool = option(False, "prune the model's output layer too (found by structure; dense by default)")
    types: Sequence[type[nn.Module]] | None = option(
        None, "the module types to prune (default: every registered layer kind, prunekit.layers.base)")
    strict: bool = option(False, "refuse, before anything changes, any weight expected pruned that would be left "
                                 "dense (a layer the pattern cannot fit, one whose forward is never called, a "
                                 "parameter no layer kind handles) instead of leaving it dense and listed")
    # -- calibration -------------------------------------------------------------------------
    blocks: Sequence[str] | None = option(
        None, "module names calibrated in order, as the forward calls them (default: every stack's blocks, an "
              "encoder's before its decoder's)", metavar="NAME")
    capture: str = option(
        "chain", "'chain' feeds each block the previous one's outputs where the model does, and re-runs the model "
                 "up to any other block (a decoder's first); 'rerun' re-runs the model up to each block",
        choices=CAPTURES)
    sequential: bool = option(
        False, "recompute statistics after every layer inside a block (always on for refines fitting the dense target)")
    max_batches: int | None = option(None, "use at most this many calibration batches")
    input_key: int | str | Callable[[Any], Any] | None = option(
        None, "what of each calibration batch the model takes: an index of a tuple batch (0: the inputs of a "
              "labelled loader's (x, y) pairs), a key of a mapping batch, or (from Python) a function of the batch "
              "(default: the whole batch)", metavar="INDEX|KEY", form="index_or_key")
    shard_calibration: bool = option(
        False, "under torchrun every rank passes the same batches and keeps batches i % world_size == rank")
    # -- the result ------------------------------------------------------------------------
    exact: bool = option(
        True, "keep each layer's requested non-zeros where a calibration input is dead (off: zero their "
              "weights, as the reference SparseGPT does)")
    recalibrate_bn: bool = option(
        False, "re-estimate BatchNorm running statistics on the calibration data after pruning")
    # -- where and how precisely -----------------------------------------------------------
    device: str | torch.device | None = option(
        None, "where the work runs, one block at a time (e.g. cuda for a model in CPU memory; "
              "default: where the model is)")
    stats_dtype: str | torch.dtype | None = option(
        None, "precision of the statistics and solvers (default float32; float64 for a float64 model)",
        choices=STATS_DTYPES)
    progress: bool | None = option(None, "progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        if self.refine in ("none", "null"):  # the spelling of "no refine" on a command line
            self.refine = None

    def replace(self, **options: Any) -> "PruneConfig":
        """A copy with ``options`` changed (``dataclasses.replace``); an unknown name is a
        TypeError naming the closest option."""
        known = [f.name for f in dataclasses.fields(self)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the options are: {', '.join(known)}"
                raise TypeError(f"unknown pruning option {key!r}; {hint} (see prunekit.PruneConfig)")
        return dataclasses.replace(self, **options) if options else self

    def validate(self, where: str = "") -> "Checked":
        """Check every value and return what they mean. A bad one is a ValueError or TypeError
        naming the option, prefixed by ``where`` (``"prune."`` in a recipe), and the fix.
        Nothing here needs the model; :mod:`prunekit.oneshot.plan` checks the rest."""
        w = where
        _check_names(self.plugins, f"{w}plugins")
        registry.load_plugins(self.plugins)
        method = _step("method", self.method, self.method_options, w)
        if self.refine is None and self.refine_options:
            raise ValueError(f"{w}refine_options were given without {w}refine; pass refine= one of "
                             f"{', '.join(registry.names('refine'))} (or drop them)")
        refine = _step("refine", self.refine, self.refine_options, w) if self.refine is not None else None
        for name in ("include_head", "strict", "sequential", "shard_calibration", "exact", "recalibrate_bn"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{w}{name} must be True or False, got {getattr(self, name)!r}")
        if self.progress not in (None, True, False):
            raise TypeError(f"{w}progress must be True, False or None (only on a terminal), got {self.progress!r}")
        _choice(self.capture, CAPTURES, f"{w}capture")
        pattern = _named(w, parse_pattern, self.pattern)
        for step in (method, refine):
            if step is not None:
                _named(f"{w}{step.role}_options: " if w else "", step.check, pattern)
        if isinstance(pattern, NM):
            given = None if self.sparsity is None else check_sparsity(self.sparsity, f"{w}sparsity")
            if given is not None and abs(given - pattern.sparsity) > 1e-9:
                raise ValueError(f"{w}sparsity={self.sparsity} contradicts {w}pattern {pattern} "
                                 f"({pattern.sparsity:g}); omit sparsity")
            if self.budget != "uniform" or self.cap is not None or self.overrides:
                raise ValueError(f"{w}pattern {pattern} fixes every layer's sparsity at {pattern.sparsity:g}; use "
                                 f"budget='uniform' without cap or overrides (got budget={self.budget!r}, "
                                 f"cap={self.cap!r}, overrides={self.overrides!r}), and exclude= for layers to "
                                 "keep dense")
            sparsity = pattern.sparsity
        elif self.sparsity is None:
            raise ValueError(f"{w}sparsity is required for unstructured pruning, e.g. sparsity=0.5")
        else:
            sparsity = check_sparsity(self.sparsity, f"{w}sparsity")
        _choice(self.budget, BUDGETS, f"{w}budget")
        if self.cap is not None:
            check_sparsity(self.cap, f"{w}cap")
        _check_overrides(self.overrides, w)
        as_patterns(self.include, f"{w}include")
        as_patterns(self.exclude, f"{w}exclude")
        if self.types is not None:
            _named(w, check_types, self.types)
        _check_names(self.blocks, f"{w}blocks")
        check_int(self.max_batches, f"{w}max_batches", 1, optional=True)
        _check_input_key(self.input_key, f"{w}input_key")
        _named(w, execution_device, self.device)
        _named(w, stats_precision, self.stats_dtype)
        return Checked(method, refine, pattern, sparsity)


PruneConfig.__doc__ += "\n\n    Options (default):\n\n" + "\n".join(
    f"    - ``{f.name}`` ({f.default!r}): {f.metadata['help']}" for f in dataclasses.fields(PruneConfig)) + "\n"


@dataclass(frozen=True)
class Checked:
    """What a valid :class:`PruneConfig` means: the method and refine with their options, the
    pattern, and the overall sparsity (an N:M pattern's when it sets it)."""

    method: registry.Method
    refine: registry.Refine | None
    pattern: Pattern
    sparsity: float

    @property
    def needs(self) -> frozenset[str]:
        """The calibration statistics the two steps ask for (empty: no data needed)."""
        return self.method.needs | (self.refine.needs if self.refine is not None else frozenset())


def _named(where: str, check: Any, value: Any) -> Any:
    """``check(value)``, whose errors start with the option's name, with ``where`` put first."""
    try:
        return check(value)
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}{exc}") from exc


def _step(role: str, name: Any, options: Any, where: str) -> Any:
    """The registered method or refine ``name`` made with its options (errors under ``where``)."""
    cls = registry.get(name, role, f"{where}{role}")
    return _named(f"{where}{role}_options: " if where else "", cls, options)


def _choice(value: Any, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}{hint}")


def _check_input_key(value: Any, name: str) -> None:
    """None, an index (int), a key (str) or a function of a batch."""
    if value is None or callable(value) or isinstance(value, str) or (isinstance(value, int)
                                                                     and not isinstance(value, bool)):
        return
    raise TypeError(f"{name} must be an index (0 for (x, y) batches), a key of mapping batches or a function "
                    f"batch -> inputs, got {value!r}")


def _check_names(value: Any, name: str) -> None:
    """None or a list of strings (module names), never one bare string."""
    if value is not None and (isinstance(value, str) or not isinstance(value, Sequence)
                              or not all(isinstance(v, str) for v in value)):
        raise TypeError(f"{name} must be a list of module names, got {value!r}")


def _check_overrides(overrides: Any, where: str) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise TypeError(f"{where}overrides must be a mapping of layer-name regexes to sparsities, e.g. "
                        f"{{'fc1': 0.3}}, got {overrides!r}")
    for regex, value in overrides.items():
        check_sparsity(value, f"{where}overrides[{regex!r}]")
        try:
            re.compile(regex)
        except (re.error, TypeError) as exc:
            raise ValueError(f"{where}overrides key {regex!r} is not a regular expression ({exc}); "
                             "e.g. {'fc1': 0.3}") from exc
