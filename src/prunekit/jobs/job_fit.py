"""Whether a structured job fits its model, asked right after the model loads (before data or pruning).

``structures: channels`` removes a CNN's coupled channels; ``mlp`` / ``heads`` remove a
transformer's neurons and heads. The wrong one for a model would fail later with a message about
tracing or about unrecognised layers; here it fails at once, saying which one the model needs.
"""
from __future__ import annotations

from torch import nn

from ..structures.config import StructuredConfig
from ..structures.find import find_structures
from .loading import is_causal_lm


def is_channel_job(config: StructuredConfig | None) -> bool:
    """Whether ``config`` (a recipe's ``structured:`` section, or None) removes channels."""
    return config is not None and "channels" in tuple(config.structures)


def check_job_fits(model: nn.Module, config: StructuredConfig, source: str) -> None:
    """ValueError naming ``source`` when the structures asked for do not suit ``model``: channels
    on a transformers causal LM, or MLP neurons / heads on a CNN without such structures."""
    if is_channel_job(config):
        if is_causal_lm(model) or hasattr(getattr(model, "config", None), "num_attention_heads"):
            raise ValueError(f"structures=channels removes a CNN's channels, and {source} is a transformers "
                             f"{type(model).__name__}: use structures mlp and/or heads for it")
        return
    kinds = tuple(config.structures)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()) and not find_structures(model, kinds):
        raise ValueError(f"{source} has convolutions and no {'/'.join(kinds)} structure prunekit recognises: for a "
                         "CNN use structures=channels (prunekit.prune_channels)")
