"""Saving a channel-pruned plain ``nn.Module`` so that it reloads: weights plus every module's sizes.

``prunekit.prune_channels`` leaves a model its own constructor can no longer build. A folder
written by :func:`save_channels` holds ``model.safetensors`` (the state dict) and
``prunekit_channels.json`` (:func:`prunekit.formats.module_shapes.module_shapes`: each sized
module's class, size attributes and tensor shapes, plus the example input's shape when given).
:func:`load_channels` builds the dense architecture from the user's code, resizes its modules as
recorded and loads the weights strictly, so its outputs equal the pruned model's. Optionally
``model.pt2`` (``torch.export``) is written too: a program that runs without the model's code.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
from torch import nn

from ..calls import as_call, eval_mode
from ..sparsity.storage import storage_key
from ..structures.surgery import Undo
from .module_shapes import apply_module_shapes, check_record, module_shapes

SHAPES = "prunekit_channels.json"
WEIGHTS = "model.safetensors"
EXPORTED = "model.pt2"
FORMAT = "prunekit-channels"


def is_channel_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a :func:`save_channels` record."""
    return os.path.isfile(os.path.join(os.fspath(folder), SHAPES))


def save_channels(model: nn.Module, folder: str | os.PathLike, *, example_inputs: Any = None,
                  export: bool = False) -> list[str]:
    """Write ``model`` (e.g. after ``prune_channels``) into ``folder`` (created if missing):
    ``model.safetensors`` and ``prunekit_channels.json``; returns the files written.
    ``example_inputs`` (a batch, as for calibration) records the input's shape without its batch
    dimension (``prunekit report`` then times random inputs of that shape); with ``export`` it is
    also traced by ``torch.export`` into ``model.pt2`` (load it with ``torch.export.load``)."""
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if export and example_inputs is None:
        raise ValueError("export=True needs example_inputs (a batch the model takes) to trace the model")
    folder = os.fspath(folder)
    record = _record(model, example_inputs)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, SHAPES)):  # an older save's record must not vouch for half-written weights
        os.remove(os.path.join(folder, SHAPES))
    save_model(model, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    files = [WEIGHTS, SHAPES]
    if export:
        args, kwargs = as_call(example_inputs)
        with eval_mode(model):  # the program is the inference graph; every module gets its own mode back
            program = torch.export.export(model, args, kwargs)
        torch.export.save(program, os.path.join(folder, EXPORTED))
        files.append(EXPORTED)
    _dump(record, folder)  # last: its presence marks a complete folder
    return files


def write_record(model: nn.Module, folder: str | os.PathLike, *, example_inputs: Any = None) -> str:
    """Write only ``prunekit_channels.json`` (the weights saved another way, e.g. the compact
    format); returns its path."""
    os.makedirs(os.fspath(folder), exist_ok=True)
    return _dump(_record(model, example_inputs), os.fspath(folder))


def _record(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    return {"format": FORMAT, **module_shapes(model), "input_shape": _input_shape(example_inputs)}


def _dump(record: dict[str, Any], folder: str) -> str:
    path = os.path.join(folder, SHAPES)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return path


def _input_shape(example_inputs: Any) -> list[int] | None:
    if example_inputs is None:
        return None
    args, kwargs = as_call(example_inputs)
    first = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(first, torch.Tensor) or first.dim() < 1:
        raise TypeError("example_inputs must be a batch whose first input is a tensor [N, ...]")
    return list(first.shape[1:])


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``prunekit_channels.json`` record of a :func:`save_channels` folder, checked."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder; pass the folder save_channels wrote")
    path = os.path.join(folder, SHAPES)
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} is not a prunekit channel checkpoint (no {SHAPES}); save the model with "
                         "prunekit.save_channels(model, folder), or load another checkpoint its own way")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); save the model again with prunekit.save_channels") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a prunekit channel record (format {FORMAT!r}); save the model with "
                         "prunekit.save_channels")
    check_record(record, path)
    return record


def load_channels(folder: str | os.PathLike, build_dense_model: Callable[[], nn.Module] | nn.Module) -> nn.Module:
    """The model saved by :func:`save_channels` in ``folder``, in eval mode: ``build_dense_model``
    (a callable returning the dense architecture, or such a module, which is then changed in place)
    is resized as recorded and given the saved weights. A module that differs in name or class
    from the saved model is a ValueError naming it, and a given module is then left as it was."""
    from safetensors.torch import load_file

    record = read_record(folder)
    weights = os.path.join(os.fspath(folder), WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder!r} has {SHAPES} but no {WEIGHTS}; save the model again")
    if isinstance(build_dense_model, nn.Module):
        model = build_dense_model
    elif callable(build_dense_model):
        model = build_dense_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"build_dense_model() returned a {type(model).__name__}, not an nn.Module")
    else:
        raise TypeError(f"build_dense_model must be an nn.Module or a callable returning one, got "
                        f"{type(build_dense_model).__name__}")
    load_sized(model, record, load_file(weights), where=weights)
    return model.eval()


def load_sized(model: nn.Module, record: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> None:
    """Resize ``model`` as ``record`` says and load ``state`` strictly. Every key and shape is
    checked before a tensor is written, so on any error ``model`` is left as it was."""
    undo = Undo()
    try:
        apply_module_shapes(model, record, undo)
        own = model.state_dict()
        stored = {storage_key(own[k]) for k in own if k in state} - {None}  # a tied tensor is saved once
        missing = [k for k in own if k not in state and storage_key(own[k]) not in stored]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{where} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"shapes {shapes[:3]}); build the architecture the checkpoint was saved from")
    except BaseException:
        undo.restore()
        raise
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        model.to(floats.pop())
    model.load_state_dict(state, strict=False)  # checked above; tied keys may be absent
