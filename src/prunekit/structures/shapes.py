"""Per-module shapes of a structurally pruned model, recorded and applied again.

A model whose layers have different widths cannot be described by a standard config (one
``intermediate_size``, one head count). ``structure_shapes`` records what a freshly built model
would get wrong: every parameter's shape and the integer width attributes surgery sets
(``SHAPE_ATTRS``); ``apply_structure_shapes`` gives a freshly built model those shapes (empty
parameters of the recorded shapes, the attributes set), after which ``load_state_dict`` fills it.
A record is plain JSON data, so it can live in a Hugging Face config (``prunekit_shapes``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .surgery import Undo

#: the integer attributes surgery sets on modules (Linear, transformers' Conv1D, MLPs, attention)
SHAPE_ATTRS = ("in_features", "out_features", "nx", "nf", "intermediate_size", "num_heads",
               "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "split_size", "all_head_size")
CONFIG_KEY = "prunekit_shapes"
VERSION = 1


def structure_shapes(model: nn.Module, modules: Iterable[str] | None = None) -> dict[str, Any]:
    """``{"version", "parameters": {name: shape}, "attributes": {module: {attr: int}}}`` for the
    given module names (None: every module): their own parameters and ``SHAPE_ATTRS``."""
    named = dict(model.named_modules())
    names = list(named) if modules is None else list(dict.fromkeys(modules))
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"modules {unknown[:3]} are not in the model")
    params: dict[str, list[int]] = {}
    attrs: dict[str, dict[str, int]] = {}
    for name in names:
        prefix = f"{name}." if name else ""
        for pname, p in named[name].named_parameters(recurse=False):
            params[prefix + pname] = list(p.shape)
        ints = {a: v for a in SHAPE_ATTRS
                if isinstance(v := named[name].__dict__.get(a), int) and not isinstance(v, bool)}
        if ints:
            attrs[name] = ints
    return {"version": VERSION, "parameters": params, "attributes": attrs}


def merge_shapes(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` laid over ``old`` (a second pruning of an already recorded model)."""
    if not old:
        return new
    attrs = {k: dict(v) for k, v in old.get("attributes", {}).items()}
    for k, v in new["attributes"].items():
        attrs.setdefault(k, {}).update(v)
    return {"version": VERSION, "parameters": {**old.get("parameters", {}), **new["parameters"]}, "attributes": attrs}


def _check(shapes: Any) -> None:
    if not isinstance(shapes, dict) or not isinstance(shapes.get("parameters"), dict) \
            or not isinstance(shapes.get("attributes", {}), dict):
        raise TypeError("shapes must be a record from structure_shapes(model): a dict with 'parameters' "
                        "and 'attributes'")
    if shapes.get("version", VERSION) != VERSION:
        raise ValueError(f"shapes version {shapes.get('version')!r} is not {VERSION}; upgrade prunekit")


def apply_structure_shapes(model: nn.Module, shapes: dict[str, Any]) -> nn.Module:
    """Give ``model`` the recorded shapes in place: a parameter whose shape differs (or that is
    missing, e.g. a bias a refit added) becomes an empty one of the recorded shape, and the
    recorded attributes are set. Load the weights afterwards. On any error the model is unchanged."""
    _check(shapes)
    named = dict(model.named_modules())
    undo = Undo()
    try:
        for full, shape in shapes["parameters"].items():
            owner, _, pname = full.rpartition(".")
            module = named.get(owner)
            if module is None or not (pname in module._parameters):
                raise ValueError(f"the model has no parameter slot {full!r}; is this the model the shapes were "
                                 "recorded from?")
            if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape of {full!r} must be a list of non-negative integers, got {shape!r}")
            old = module._parameters[pname]
            if old is not None and tuple(old.shape) == tuple(shape):
                continue
            like = old if old is not None else next(module.parameters(), None)
            dtype = like.dtype if like is not None else torch.get_default_dtype()
            device = like.device if like is not None else None
            undo.set(module, pname, nn.Parameter(torch.empty(*shape, dtype=dtype, device=device),
                                                 requires_grad=old.requires_grad if old is not None else True))
        for owner, values in shapes.get("attributes", {}).items():
            module = named.get(owner)
            if module is None:
                raise ValueError(f"the model has no module {owner!r}; is this the model the shapes were recorded from?")
            for attr, value in values.items():
                if attr not in SHAPE_ATTRS or isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{owner}.{attr}: only integer {', '.join(SHAPE_ATTRS)} are applied, got {value!r}")
                undo.set(module, attr, value)
    except BaseException:
        undo.restore()
        raise
    return model
