"""``structures: channels`` in a :class:`StructuredConfig`: its fields as ``prune_channels`` keywords.

A recipe's ``structured:`` section and ``prunekit prune --structures channels`` describe a channel
job with the same fields as an MLP/heads job. This module says which of them mean something for
:func:`prunekit.prune_channels` and checks them before any model is loaded: ``method`` is its
``score``; ``exclude`` (regexes) becomes one regex; a field ``prune_channels`` has a keyword of the
same name for (``ratio``, ``flops``, ``refine``, ``recalibrate_bn``, ``damp``, ``max_batches``, and
any it gains) is passed as it is; any other field must keep its default, else a ValueError names it.
``rank_by`` names the tables :func:`channel_tables` measures on the model (``prune_channels``'
``latency=`` / ``sensitivity=``); ``speedup`` needs the latency table too.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ..oneshot.calibration import collect_batches
from .channel_latency import measure_channel_latency
from .channel_sensitivity import measure_channel_sensitivity
from .channels import REFINES, SCORES, prune_channels

#: fields that are never a prune_channels keyword: what the job is, and how it shows progress
_NOT_PASSED = {"structures", "method", "progress", "exclude", "shard_calibration", "rank_by"}


def _accepted() -> set[str]:
    return set(inspect.signature(prune_channels).parameters) - {"model", "calibration"}


def check_channel_options(config: Any, where: str = "") -> None:
    """ValueError naming the option when ``config`` (a StructuredConfig with ``structures``
    ``("channels",)``) sets something ``prune_channels`` cannot take."""
    w = where
    if config.method not in SCORES:
        raise ValueError(f"{w}method must be one of {', '.join(SCORES)} for structures=channels (it is prune_channels' "
                         f"score), got {config.method!r}")
    if config.refine not in REFINES:
        names = ", ".join("none" if r is None else r for r in REFINES)
        raise ValueError(f"{w}refine must be one of {names} for structures=channels, got {config.refine!r}")
    if config.recalibrate_bn not in (None, True, False):
        raise TypeError(f"{w}recalibrate_bn must be True or False, got {config.recalibrate_bn!r}")
    accepted = _accepted()
    for f in dataclasses.fields(config):
        if f.name in _NOT_PASSED or f.name in accepted:
            continue
        if getattr(config, f.name) != f.default:
            raise ValueError(f"{w}{f.name} applies to structures mlp and heads, not channels (prune_channels has no "
                             f"such option); remove it")


def channel_kwargs(config: Any) -> dict[str, Any]:
    """The keywords of ``prune_channels`` that ``config`` (checked by
    :func:`check_channel_options`) gives: ``score`` from ``method``, ``exclude`` as one regex, and
    every same-named field (``recalibrate_bn`` only when set)."""
    out: dict[str, Any] = {"score": config.method}
    accepted = _accepted()
    for f in dataclasses.fields(config):
        if f.name in accepted and f.name not in _NOT_PASSED:
            out[f.name] = getattr(config, f.name)
    if out.get("recalibrate_bn", True) is None:
        del out["recalibrate_bn"]
    exclude = config.exclude
    if exclude:
        out["exclude"] = exclude if isinstance(exclude, str) else "|".join(f"(?:{r})" for r in exclude)
    return out


def channel_tables(config: Any, model: Any, calibration: Any) -> dict[str, Any]:
    """The ``latency=`` / ``sensitivity=`` tables ``config.rank_by`` and ``config.speedup`` ask for,
    measured on ``model`` (latency: on the first calibration batch, as it will run; sensitivity:
    on the calibration batches, with the job's score and ridge)."""
    rank_by, out = config.rank_by or "score", {}
    where = {"exclude": channel_kwargs(config).get("exclude")}
    if "latency" in rank_by or config.speedup is not None:
        calls = collect_batches(calibration, 1)
        out["latency"] = measure_channel_latency(model, calls[0][0], **where)
    if "sensitivity" in rank_by:
        out["sensitivity"] = measure_channel_sensitivity(
            model, calibration, score=config.method, damp=config.damp, max_batches=config.max_batches, **where,
            refine=None if config.refine is None else "lstsq")
    return out
