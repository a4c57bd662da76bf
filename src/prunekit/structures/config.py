"""``StructuredConfig``: every option of structured pruning, with its default and its checks.

This is the one list of what :func:`prunekit.prune_structured` accepts. Its keywords, a
recipe's ``structured:`` section (:mod:`prunekit.jobs.recipe`) and the structured flags of
``prunekit prune`` (:mod:`prunekit.cli.prune_cmd`) are views of these fields, as for
:class:`~prunekit.oneshot.config.PruneConfig`: a new option is one field here, with its help.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..oneshot.config import option
from ..oneshot.runtime.placement import execution_device
from ..oneshot.solvers.columns import SCORES
from .budget import BUDGETS

KINDS = ("mlp", "heads", "channels")
METHODS = SCORES
REFINES = (None, "bias", "lstsq", "snows")
BIASES = ("auto", True, False)
TARGETS = ("pruned", "dense")
RANKINGS = ("score", "latency", "sensitivity", "sensitivity+latency")


@dataclass(kw_only=True)
class StructuredConfig:
    """Every option of :func:`prunekit.prune_structured`, with its default
    (``prune_structured(**options)`` builds one). :meth:`validate` checks them all before the
    model is touched."""

    # -- what is removed, and how much -------------------------------------------------------
    structures: str | Sequence[str] = option(
        ("mlp",), "what to remove: 'mlp' (MLP neurons), 'heads' (attention heads) or both, comma-separated; or "
                  "'channels' (a CNN's coupled channels, by prunekit.prune_channels)",
        metavar="mlp,heads|channels", form=str)
    ratio: float | None = option(
        None, "fraction of every structure's units to remove, in (0, 1); give one of ratio, params, flops")
    params: float | None = option(
        None, "fraction of the parameters of the layers holding the structures to remove, in (0, 1), "
              "(with the closest uniform ratio, or ranked globally with budget=global); give one of ratio, params, "
              "flops")
    flops: float | None = option(
        None, "fraction of the FLOPs per token of the layers holding the structures to remove, in (0, 1) "
              "(matrices plus attention products at the calibration length)")
    budget: str = option(
        "uniform", "uniform: the same count in every layer (a standard config); global: units of all layers "
                   "ranked together (per-layer widths, reloaded by prunekit.load_structured)", choices=BUDGETS)
    floor: float | None = option(
        None, "with budget=global, the least fraction of each structure's units kept (default 0.25)")
    multiple_of: int = option(1, "round every MLP's kept width (or each channel group's kept channels) to a "
                                      "multiple of this (CPU kernels favour e.g. 64 for MLPs, 8 for convs)")
    # -- which units go, and how the rest is repaired -----------------------------------------
    method: str = option("wanda", "how the units to remove are chosen; for channels prune_channels' score (l2, bn, "
                                  "wanda or obs), else", choices=METHODS)
    refine: str | None = option(
        "lstsq", "how the consumer's kept columns are repaired: lstsq (least squares), snows (least squares, then "
                 "SNOWS's K-step lookahead), bias (FLAP's bias compensation) or none",
        choices=("lstsq", "snows", "bias", "none"))
    refine_options: Mapping[str, Any] | None = option(
        None, "SNOWS's options with refine=snows (prunekit.SnowsOptions fields, e.g. k=4, max_cg=20)")
    bias: str | bool = option(
        "auto", "fit the consumer's bias with lstsq, adding one where it has none (auto: only where it has one)")
    target: str = option(
        "pruned", "what the refit matches: the layer's own inputs (pruned) or the dense model's (dense)",
        choices=TARGETS)
    damp: float = option(0.1, "ridge of the refit, pulling the kept columns towards their dense values")
    # -- channels only ----------------------------------------------------------------------
    recalibrate_bn: bool | None = option(
        None, "channels only: re-estimate BatchNorm statistics on the calibration data afterwards (default on)")
    exclude: str | Sequence[str] | None = option(
        None, "channels only: regexes of module names whose channels stay (traced as leaves: also the way past a "
              "module torch.fx cannot trace)", metavar="REGEX")
    rank_by: str | None = option(
        None, "channels only, with budget=global: what ranks channels across groups: score (normalised; the "
              "default), latency (score per millisecond, timed on the first calibration batch), sensitivity (output "
              "error measured per group and width) or sensitivity+latency", choices=RANKINGS)
    speedup: float | None = option(
        None, "channels only, with budget=global: remove channels until a latency table timed on the first "
              "calibration batch predicts this many times dense speed (then flops/params if given)")
    # -- calibration ------------------------------------------------------------------------
    blocks: Sequence[str] | None = option(
        None, "module names calibrated in order (default: detected)", metavar="NAME")
    max_batches: int | None = option(None, "use at most this many calibration batches")
    shard_calibration: bool = option(
        False, "under torchrun every rank passes the same batches and keeps batches i % world_size == rank "
               "(otherwise each rank passes its own share); the statistics are summed over the ranks")
    # -- where ------------------------------------------------------------------------------
    device: str | torch.device | None = option(
        None, "where each block is calibrated, scored, refit and cut, one at a time (e.g. cuda for a model in "
              "CPU memory; default: where the model is)")
    progress: bool | None = option(None, "progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        if self.refine in ("none", "null"):  # the spelling of "no refine" on a command line
            self.refine = None
        if isinstance(self.structures, str):  # "mlp,heads" and ["mlp", "heads"] are one config
            self.structures = tuple(s.strip() for s in self.structures.split(",") if s.strip())
        elif isinstance(self.structures, list):
            self.structures = tuple(self.structures)
        if isinstance(self.exclude, list):
            self.exclude = tuple(self.exclude)

    def replace(self, **options: Any) -> "StructuredConfig":
        """A copy with ``options`` changed; an unknown name is a TypeError naming the closest option."""
        known = [f.name for f in dataclasses.fields(self)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the options are: {', '.join(known)}"
                raise TypeError(f"unknown structured pruning option {key!r}; {hint} (see prunekit.StructuredConfig)")
        return dataclasses.replace(self, **options) if options else self

    @property
    def needs_data(self) -> bool:
        """Whether calibration data is needed (all but magnitude scores without a refit; channels
        always: the model is traced on a batch)."""
        return "channels" in tuple(self.structures) or not (self.method == "magnitude" and self.refine is None)

    def validate(self, where: str = "") -> tuple[str, ...]:
        """Check every value and return the structures asked for. A bad one is a ValueError or
        TypeError naming the option, prefixed by ``where`` (``"structured."`` in a recipe), and
        the fix. Nothing here needs the model; ``prune_structured`` checks the rest."""
        w = where
        structures = self.structures
        if isinstance(structures, tuple) and "experts" in structures:
            raise ValueError(f"{w}structures: experts of mixture-of-experts layers are removed by "
                             "pk.prune_experts(model, calibration, ratio=...), not by prune_structured")
        if not isinstance(structures, tuple) or not structures or any(s not in KINDS for s in structures):
            raise ValueError(f"{w}structures must be drawn from 'mlp', 'heads' (e.g. 'mlp,heads'), or be 'channels', "
                             f"got {structures!r}")
        if "channels" in structures:
            return self._validate_channels(structures, w)
        for name in ("recalibrate_bn", "exclude", "rank_by", "speedup"):
            if getattr(self, name) is not None:
                raise ValueError(f"{w}{name} applies to structures=channels (a CNN's channels), not "
                                 f"{','.join(structures)}; remove it")
        _choice(self.method, METHODS, f"{w}method", " for structures")
        _choice(self.refine, REFINES, f"{w}refine", " for structures")
        if not (self.bias is True or self.bias is False or self.bias == "auto"):
            raise ValueError(f"{w}bias must be 'auto', True or False, got {self.bias!r}")
        _choice(self.target, TARGETS, f"{w}target")
        if sum(v is not None for v in (self.ratio, self.params, self.flops)) != 1:
            raise ValueError(f"give exactly one of {w}ratio= (fraction of each structure's units), {w}params= "
                             f"(fraction of the parameters to remove) or {w}flops= (fraction of the FLOPs per token)")
        _choice(self.budget, BUDGETS, f"{w}budget", " for structures")
        if self.floor is not None and self.budget != "global":
            raise ValueError(f"{w}floor= (the least share of each structure's units kept) applies to budget='global'")
        if self.floor is not None and not (_number(self.floor) and 0 <= self.floor < 1):
            raise ValueError(f"{w}floor must be a number in [0, 1), got {self.floor!r}")
        for name in ("ratio", "params", "flops"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and 0 < value < 1):
                raise ValueError(f"{w}{name} must be a number in (0, 1), got {value!r}")
        for name, value in (("multiple_of", self.multiple_of), ("max_batches", 1 if self.max_batches is None else self.max_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{w}{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (_number(self.damp) and self.damp >= 0):
            raise ValueError(f"{w}damp must be a number >= 0, got {self.damp!r}")
        if self.blocks is not None and (isinstance(self.blocks, str) or not isinstance(self.blocks, Sequence)
                                        or not all(isinstance(b, str) for b in self.blocks)):
            raise TypeError(f"{w}blocks must be a list of module names, got {self.blocks!r}")
        if self.shard_calibration not in (True, False):
            raise TypeError(f"{w}shard_calibration must be True or False, got {self.shard_calibration!r}")
        try:
            execution_device(self.device)
        except ValueError as exc:
            raise ValueError(f"{w}{exc}") from None
        if self.progress not in (None, True, False):
            raise TypeError(f"{w}progress must be True, False or None (only on a terminal), got {self.progress!r}")
        return structures

    def _validate_channels(self, structures: tuple[str, ...], w: str) -> tuple[str, ...]:
        """``structures: channels``: alone, with the options ``prune_channels`` takes."""
        from .channel_options import check_channel_options

        if structures != ("channels",):
            raise ValueError(f"{w}structures 'channels' (a CNN's channels) does not combine with "
                             f"{', '.join(s for s in structures if s != 'channels')}; give channels alone")
        given = sum(v is not None for v in (self.ratio, self.params, self.flops))
        if given > 1 or (given == 0 and self.speedup is None):
            raise ValueError(f"give exactly one of {w}ratio= (fraction of every channel group), {w}flops= "
                             f"(fraction of the multiply-adds to remove) or {w}params= for structures=channels "
                             f"(or {w}speedup= alone)")
        if self.rank_by is not None:
            _choice(self.rank_by, RANKINGS, f"{w}rank_by", " for structures=channels")
        if self.speedup is not None and not (_number(self.speedup) and 1 < self.speedup < float("inf")):
            raise ValueError(f"{w}speedup must be a number > 1 (how many times faster than dense), got {self.speedup!r}")
        if (self.rank_by not in (None, "score") or self.speedup is not None) and self.budget != "global":
            raise ValueError(f"{w}rank_by and {w}speedup rank channels across groups: set {w}budget=global")
        if self.rank_by is not None and self.ratio is not None and self.rank_by != "score":
            raise ValueError(f"{w}rank_by applies to flops=, params= or speedup= targets, not ratio=")
        for name in ("ratio", "params", "flops"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and 0 < value < 1):
                raise ValueError(f"{w}{name} must be a number in (0, 1), got {value!r}")
        if not (_number(self.damp) and self.damp >= 0):
            raise ValueError(f"{w}damp must be a number >= 0, got {self.damp!r}")
        if self.max_batches is not None and (isinstance(self.max_batches, bool) or not isinstance(self.max_batches, int)
                                             or self.max_batches < 1):
            raise ValueError(f"{w}max_batches must be an integer >= 1, got {self.max_batches!r}")
        if self.exclude is not None and not isinstance(self.exclude, str) and not (
                isinstance(self.exclude, Sequence) and all(isinstance(e, str) for e in self.exclude)):
            raise TypeError(f"{w}exclude must be a regex or a list of them, got {self.exclude!r}")
        check_channel_options(self, w)
        return structures


StructuredConfig.__doc__ += "\n\n    Options (default):\n\n" + "\n".join(
    f"    - ``{f.name}`` ({f.default!r}): {f.metadata['help']}" for f in dataclasses.fields(StructuredConfig)) + "\n"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _choice(value: Any, choices: Sequence[Any], name: str, context: str = "") -> None:
    if value not in choices or isinstance(value, bool):
        names = ", ".join("None" if c is None else repr(c) for c in choices)
        close = difflib.get_close_matches(str(value), [c for c in choices if isinstance(c, str)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {names}{context}, got {value!r}{hint}")
