"""Reloading a structurally pruned Hugging Face folder whose layers have different widths.

``prune_structured`` with a non-uniform result (``budget="global"``) records every changed
module's shapes in the model's config (``prunekit_shapes``), so plain ``model.save_pretrained``
writes them into ``config.json`` beside the weights. :func:`load_structured` builds the model from
that config, gives it the recorded shapes (``structures.shapes.apply_structure_shapes``) and loads
the weights. A folder without the entry (a uniform result, or any ordinary checkpoint) loads the
same way, and plain ``from_pretrained`` loads it too.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..structures.shapes import CONFIG_KEY, apply_structure_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, SINGLE)):
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}; save the model with save_pretrained(folder)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that ``save_pretrained`` leaves out because they are tied to another."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if getattr(getattr(model, "config", None), "tie_word_embeddings", True) else set()


def load_structured(folder: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """The model saved in ``folder`` by ``save_pretrained``, with the per-layer widths its config
    records, in eval mode (transformers needed). ``model_class``: the class to build (default: the
    config's ``architectures``, else ``AutoModelForCausalLM``). The model is built at full size
    from the config first, then shrunk, so it briefly needs the dense model's memory."""
    try:
        import transformers
    except ImportError as e:  # transformers is an optional extra
        raise ImportError("load_structured needs transformers: pip install 'prunekit[hf]'") from e
    folder = os.fspath(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
    if model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif hasattr(model_class, "_from_config"):
        model = model_class._from_config(config)
    else:
        model = model_class(config)
    shapes = getattr(config, CONFIG_KEY, None)
    if shapes:
        apply_structure_shapes(model, shapes)
    state = _weights(folder)
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        model.to(floats.pop())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{folder}: the weights do not match the model built from its config (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); was it saved with save_pretrained?")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
