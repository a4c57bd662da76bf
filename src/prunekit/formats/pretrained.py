"""A Hugging Face folder in the compact format: ``config.json`` plus ``model.prunekit.safetensors``.

For an ordinary checkpoint that plain transformers (and every serving engine) loads, call
``model.save_pretrained(folder)``: a pruned model is a plain model, its zeros are just zeros. This
folder is for storage and transfer, and comes back with :func:`load_pretrained_compressed`.
"""
from __future__ import annotations

import copy
import os
from typing import Any

from torch import nn

from .compact import load, save

CHECKPOINT_NAME = "model.prunekit.safetensors"


def save_pretrained_compressed(model: nn.Module, directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` (via the model's config) plus a compressed ``model.prunekit.safetensors``.

    ``config.json`` names the model's class under ``architectures`` (as ``save_pretrained`` does),
    so a model built from a config alone (e.g. ``Qwen2ForCausalLM(config)``) comes back as its own
    class; the model's own config is not changed. Returns :func:`prunekit.save`'s summary.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError("save_pretrained_compressed needs a Hugging Face model (with .config)")
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    return save(model, os.path.join(directory, CHECKPOINT_NAME))


def load_pretrained_compressed(directory: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained_compressed` (transformers needed), in eval mode.

    The class is ``model_class`` if given, else the config's ``architectures`` (else the class the
    checkpoint recorded) when transformers has it, else ``AutoModel``.
    """
    try:
        import transformers
    except ImportError as e:  # transformers is an optional extra
        raise ImportError("load_pretrained_compressed needs transformers: pip install 'prunekit[hf]'") from e
    config = transformers.AutoConfig.from_pretrained(directory)
    path = os.path.join(directory, CHECKPOINT_NAME)
    if model_class is None:
        archs = getattr(config, "architectures", None) or [_recorded_class(path)]
        model_class = getattr(transformers, archs[0], None) if archs[0] else None
    model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    return load(path, model.eval())


def _recorded_class(path: str) -> str:
    """The model class a checkpoint's metadata names ('' when it names none or cannot be read)."""
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("model_class", "")
    except Exception:  # noqa: BLE001 - load() reports an unreadable file properly
        return ""
