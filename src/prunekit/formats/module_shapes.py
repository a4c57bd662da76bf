"""Every sized module of a plain ``nn.Module``, recorded and given back to a freshly built model.

A CNN whose channels were removed (``prunekit.prune_channels``) cannot be rebuilt by its own
constructor: each conv, BatchNorm, Linear, LayerNorm or attention has its own width now.
:func:`module_shapes` records, for every module holding parameters or buffers of its own, its
class, its size attributes (``in_channels``, ``num_features``, ``normalized_shape``, ...; the ones
of :data:`SIZE_ATTRS` it has) and the shape of each parameter and buffer. :func:`apply_module_shapes`
gives a dense model built from the same code those sizes (empty tensors of the recorded shapes,
attributes set) so that a strict ``load_state_dict`` then fills it. The record is plain JSON data.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..structures.mha import PrunedMultiheadAttention
from ..structures.surgery import Undo

#: the size attributes recorded and set (those a module has, as ints or tuples of ints)
SIZE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
              "normalized_shape", "num_groups", "num_channels", "embed_dim", "kdim", "vdim", "num_heads", "head_dim")
VERSION = 1


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _size(value: Any) -> int | list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def module_shapes(model: nn.Module) -> dict[str, Any]:
    """``{"version", "modules": {name: {"class", "attributes", "parameters", "buffers"}}}`` for
    every module of ``model`` that holds a parameter or buffer of its own."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        params = {p: list(t.shape) for p, t in m._parameters.items() if t is not None}
        buffers = {b: list(t.shape) for b, t in m._buffers.items() if t is not None}
        if not params and not buffers:
            continue
        attrs = {a: v for a in SIZE_ATTRS if (v := _size(m.__dict__.get(a))) is not None}
        modules[name] = {"class": _class_name(m), "attributes": attrs, "parameters": params, "buffers": buffers}
    return {"version": VERSION, "modules": modules}


def check_record(record: Any, where: str = "the record") -> None:
    """TypeError/ValueError unless ``record`` is a :func:`module_shapes` record this version reads."""
    if not isinstance(record, dict) or not isinstance(record.get("modules"), dict):
        raise TypeError(f"{where} is not a module_shapes record (a dict with 'modules')")
    if record.get("version") != VERSION:
        raise ValueError(f"{where} has version {record.get('version')!r}, not {VERSION}; upgrade prunekit")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ValueError(f"{where}: a shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def apply_module_shapes(model: nn.Module, record: dict[str, Any], undo: Undo | None = None) -> nn.Module:
    """Give ``model`` (built dense from the same code) the recorded sizes, in place: every
    recorded module must be there with the same class (an ``nn.MultiheadAttention`` recorded as
    :class:`~prunekit.structures.mha.PrunedMultiheadAttention` is swapped for one), and every
    module of the model holding parameters must be recorded; ValueError naming the first module
    that differs. Weights are left empty where a shape changed: load the state dict next.
    On any error the model is unchanged; every change is logged in ``undo`` when given (so a
    caller can take them back after a later step fails)."""
    check_record(record)
    recorded = record["modules"]
    named = dict(model.named_modules())
    for name, m in named.items():
        if name not in recorded and any(t is not None for t in m._parameters.values()):
            raise ValueError(f"module {name!r} ({type(m).__name__}) of the model is not in the checkpoint; build the "
                             "architecture the checkpoint was saved from")
    own, undo = undo is None, undo if undo is not None else Undo()
    try:
        for name, entry in recorded.items():
            if name not in named:
                raise ValueError(f"the checkpoint has module {name!r}, which the model has not; build the "
                                 "architecture the checkpoint was saved from")
            module = model.get_submodule(name)
            module = _same_class(model, name, module, entry["class"], undo)
            for kind, slots in (("parameters", module._parameters), ("buffers", module._buffers)):
                for slot, value in entry.get(kind, {}).items():
                    shape = _shape(value, f"{name}.{slot}")
                    if slot not in slots:
                        raise ValueError(f"module {name!r} has no {kind[:-1]} {slot!r}; build the architecture the "
                                         "checkpoint was saved from")
                    old = slots[slot]
                    if old is not None and tuple(old.shape) == shape:
                        continue
                    like = old if old is not None else next(iter(module.parameters(recurse=False)), None)
                    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
                    new = torch.empty(shape, **kw)
                    if kind == "parameters":
                        new = nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True)
                    undo.set(module, slot, new)
            for attr, value in entry.get("attributes", {}).items():
                if attr not in SIZE_ATTRS or _size(value) is None:
                    raise ValueError(f"{name}.{attr}: only the size attributes {', '.join(SIZE_ATTRS)} (integers "
                                     f"or lists of them) are applied, got {value!r}")
                undo.set(module, attr, tuple(value) if isinstance(value, list) else value)
    except BaseException:
        if own:
            undo.restore()
        raise
    return model


def _same_class(model: nn.Module, name: str, module: nn.Module, recorded: str, undo: Undo) -> nn.Module:
    """``module``, or the drop-in that replaces it; ValueError naming it when the classes differ."""
    if _class_name(module) == recorded:
        return module
    if recorded == _class_name_of(PrunedMultiheadAttention) and type(module) is nn.MultiheadAttention and name:
        new = PrunedMultiheadAttention.from_torch(module, name)
        parent, _, child = name.rpartition(".")
        undo.set(model.get_submodule(parent), child, new)
        return new
    raise ValueError(f"module {name!r} is a {_class_name(module)} in the model but a {recorded} in the checkpoint; "
                     "build the architecture the checkpoint was saved from")


def _class_name_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
