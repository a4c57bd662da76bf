"""Which blocks one-shot pruning calibrates when ``blocks=`` is not given: every stack's.

A *stack* is an outermost ``nn.ModuleList`` of two or more modules, at least one of which holds
a prunable layer (T5's ``encoder.block`` and ``decoder.block``; Whisper's and Bart's
``model.encoder.layers`` and ``model.decoder.layers``; a decoder-only LLM's one ``layers``).
Lists inside a stack (T5's ``block.0.layer``, a mixture of experts' ``experts``) are parts of
its blocks, and lists of embeddings hold no prunable layer. With two stacks or more, the
blocks are ordered by one hooked forward of a calibration batch, as the model first calls each
(an encoder's before the decoder's it feeds; two lists a forward alternates between,
interleaved), and a block that forward never calls is left out: its layers are pruned in the
whole-model pass with the other layers outside every block. One stack, or no batch (magnitude,
no data): the blocks in the order they are registered. An ``nn.Sequential`` model is a
chain of its children, and a model with no stack falls back to :func:`.blocks.find_blocks`.

There is no table of model classes: the rule reads structure and one forward only. Where one
stack ends and the next begins, a block's inputs are not the previous block's outputs: the
chain check (:mod:`.links`) finds that and captures them by re-running the model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..calls import StopForward
from ..layers.targets import find_targets
from .blocks import find_blocks, run_model


def find_stacks(model: nn.Module, names: Sequence[str] | None = None,
                call: tuple[tuple, dict] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks to calibrate, in execution order, as ``(name, module)``: the modules
    ``names`` gives, else every stack's blocks, the stacks ordered by one forward of ``call``
    (see the module's docstring)."""
    if names is not None or isinstance(model, nn.Sequential):
        return find_blocks(model, names)
    stacks = block_lists(model)
    if not stacks:
        return find_blocks(model)
    if len(stacks) > 1 and call is not None:
        return _in_call_order(model, stacks, call)
    return [(f"{name}.{i}", block) for name, stack in stacks for i, block in enumerate(stack)]


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every outermost ``nn.ModuleList`` of two or more modules, one holding a prunable layer,
    in registration order."""
    prunable = {id(m) for m in find_targets(model, types=None, include_head=True).values()}
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if any(id(m) in prunable for m in module.modules()):
            found.append((name, module))
    return found


@torch.no_grad()
def _in_call_order(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]],
                   call: tuple[tuple, dict]) -> list[tuple[str, nn.Module]]:
    """The blocks of ``stacks`` ordered by their first call in one forward of ``call``, those it
    never calls left out (all of them, in registration order, when the forward fails or calls
    none: the pipeline's own check then reports data that does not fit)."""
    blocks = [(f"{name}.{i}", block) for name, stack in stacks for i, block in enumerate(stack)]
    called: list[int] = []

    def hook(index: int):
        def pre(_module, _args):
            if index not in called:
                called.append(index)
                if len(called) == len(blocks):
                    raise StopForward
        return pre

    handles = [block.register_forward_pre_hook(hook(i)) for i, (_, block) in enumerate(blocks)]
    try:
        run_model(model, *call)
    except StopForward:
        pass
    except Exception:
        return blocks
    finally:
        for h in handles:
            h.remove()
    return [blocks[i] for i in called] if called else blocks
