"""Depth pruning: remove whole blocks that change their input least (ShortGPT's block importance).

A block's importance is ``1 - cos(x_in, x_out)`` averaged over every calibration token: a block
whose output is nearly its input (the residual stream passes through) can go, and the next block
reads the stream directly. The model's ``ModuleList`` loses the blocks, every ``layer_idx`` (the
KV-cache slot) is renumbered and ``config.num_hidden_layers`` (and ``layer_types``) follow, so
``save_pretrained`` gives a standard checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..calls import eval_mode
from ..oneshot.blocks import capture_inputs, find_blocks, first_output
from ..oneshot.calibration import collect_batches
from .shapes import CONFIG_KEY, structure_shapes
from .surgery import Undo


@dataclass
class DepthResult:
    """Block importances (in block order), the blocks removed, and parameters before/after."""

    importance: dict[str, float] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0


@torch.no_grad()
def block_importance(model: nn.Module, calibration: Iterable[Any], *, blocks: Sequence[str] | None = None,
                     max_batches: int | None = None) -> dict[str, float]:
    """``{block name: 1 - mean cos(x_in, x_out)}`` over every calibration token, dense model."""
    calls = collect_batches(calibration, max_batches)
    block_list = find_blocks(model, blocks)
    with eval_mode(model):
        inputs = capture_inputs(model, block_list[0][1], calls)
        out: dict[str, float] = {}
        for name, block in block_list:
            total, count = 0.0, 0
            for i, (args, kwargs) in enumerate(inputs):
                x = args[0]
                y = first_output(block(*args, **kwargs))
                cos = nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                                      y.reshape(-1, y.shape[-1]).double(), dim=-1)
                total += float((1 - cos).sum())
                count += cos.numel()
                inputs[i] = ((y, *args[1:]), kwargs)
            out[name] = total / max(count, 1)
    return out


def prune_blocks(model: nn.Module, calibration: Iterable[Any], *, count: int | None = None,
                 ratio: float | None = None, blocks: Sequence[str] | None = None,
                 max_batches: int | None = None) -> DepthResult:
    """Remove the ``count`` (or ``ratio`` of the) least important blocks of ``model`` in place.

    The blocks must be items of one ``nn.ModuleList`` (a transformer's layers); at least one
    block is kept. Ties break towards the later block."""
    start = time.perf_counter()
    block_list = find_blocks(model, blocks)
    names = [n for n, _ in block_list]
    parent_name = names[0].rsplit(".", 1)[0] if "." in names[0] else None
    parent = model.get_submodule(parent_name) if parent_name is not None else None
    if not isinstance(parent, nn.ModuleList) or any(n.rsplit(".", 1)[0] != parent_name for n in names):
        raise ValueError("depth pruning needs blocks that are items of one nn.ModuleList (a transformer's layers); "
                         f"got {names[:3]}")
    if (count is None) == (ratio is None):
        raise ValueError("give exactly one of count= (blocks to remove) or ratio= (fraction of the blocks)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
        count = round(ratio * len(names))
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < len(names):
        raise ValueError(f"count must be an integer in [0, {len(names) - 1}] (at least one block stays), got {count!r}")
    result = DepthResult(params_before=sum(p.numel() for p in model.parameters()))
    result.importance = block_importance(model, calibration, blocks=blocks, max_batches=max_batches)
    ranked = sorted(names, key=lambda n: (result.importance[n], -names.index(n)))
    result.removed = sorted(ranked[:count], key=names.index)
    undo = Undo()
    try:
        remove_blocks(model, parent_name, [names.index(n) for n in result.removed], undo)
    except BaseException:
        undo.restore()
        raise
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    return result


def remove_blocks(model: nn.Module, list_name: str, indices: list[int], undo: Undo) -> None:
    """Drop items ``indices`` of the ModuleList ``list_name``; renumber ``layer_idx`` and the config."""
    parent_path, _, attr = list_name.rpartition(".")
    owner = model.get_submodule(parent_path) if parent_path else model
    old = getattr(owner, attr)
    kept = [m for i, m in enumerate(old) if i not in set(indices)]
    undo.set(owner, attr, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                undo.set(module, "layer_idx", new_index)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) == len(old):
        undo.set(config, "num_hidden_layers", len(kept))
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(old):
            undo.set(config, "layer_types", [t for i, t in enumerate(types) if i not in set(indices)])
    if config is not None and getattr(config, CONFIG_KEY, None):  # per-layer widths: renumbered with the blocks
        undo.set(config, CONFIG_KEY, structure_shapes(model))
