"""The per-method keywords ``prune()`` used to take, mapped onto ``method_options`` /
``refine_options`` with a ``DeprecationWarning`` that names the new spelling.

This is the one place outside the method files that names a method; delete it with the
keywords.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping


def _warn(old: str, new: str) -> None:
    warnings.warn(f"prune({old}=...) is deprecated; pass {new} instead", DeprecationWarning, stacklevel=4)


def legacy_options(
    method: str,
    refine: str | None,
    method_options: Mapping[str, Any] | None,
    refine_options: Mapping[str, Any] | None,
    *,
    snows: Any = None,
    sparsegpt_block_size: int | None = None,
    damp: float | None = None,
    lstsq_damp: float | None = None,
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """``(method_options, refine_options)`` with the old keywords folded in (the new mappings
    win where both set a key). As before, a keyword for a method not in use is ignored."""
    from .lookahead import SnowsConfig

    old_method: dict[str, Any] = {}
    old_refine: dict[str, Any] = {}
    if snows is not None:
        _warn("snows", "refine_options={...} with the same keys, flat")
        if isinstance(snows, SnowsConfig):
            snows = {"k": snows.k, "warm_start": snows.warm_start, **dataclasses.asdict(snows.solver)}
        elif not isinstance(snows, Mapping):
            raise TypeError(f"snows must be a SnowsConfig or a dict of options, got {type(snows).__name__}")
        if refine == "snows":
            old_refine.update(snows)
    for old, key, value in (("sparsegpt_block_size", "block_size", sparsegpt_block_size), ("damp", "damp", damp)):
        if value is not None:
            _warn(old, f"method_options={{'{key}': ...}}")
            if method == "sparsegpt":
                old_method[key] = value
    if lstsq_damp is not None:
        _warn("lstsq_damp", "refine_options={'damp': ...} (lstsq) or {'warm_start_damp': ...} (snows)")
        if refine in ("lstsq", "snows"):
            old_refine["damp" if refine == "lstsq" else "warm_start_damp"] = lstsq_damp
    if old_method and (method_options is None or isinstance(method_options, Mapping)):
        method_options = {**old_method, **(method_options or {})}
    if old_refine and (refine_options is None or isinstance(refine_options, Mapping)):
        refine_options = {**old_refine, **(refine_options or {})}
    return method_options, refine_options
