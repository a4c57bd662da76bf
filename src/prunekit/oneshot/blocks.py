"""Blocks: the units one-shot pruning calibrates in order, and how their inputs are captured.

A model is split into an ordered list of blocks (the children of an ``nn.Sequential`` model,
or the largest ``nn.ModuleList`` of a transformer, or the whole model as one block:
:func:`find_blocks`, what structured pruning uses; one-shot pruning takes every stack's blocks,
:mod:`.stacks`). Block ``b`` is fed the inputs that the already-pruned model gives it, captured
with a forward pre-hook; afterwards its outputs become the next block's first argument (the
*chain*), with the other arguments (attention mask, position embeddings, ...) passed along
unchanged, where the model itself does so (:mod:`.links` checks where).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calls import StopForward, first_input, module_device, to_device


CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache_params")


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def find_blocks(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's blocks, in execution order, as ``(name, module)``."""
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"blocks {missing} are not modules of the model; use names from model.named_modules()")
        return [(n, modules[n]) for n in names]
    if isinstance(model, nn.Sequential):
        return [(n, m) for n, m in model.named_children()]
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > sum(p.numel() for p in best[1].parameters()):
                best = (name, module)
    if best is not None:
        return [(f"{best[0]}.{i}", m) for i, m in enumerate(best[1])]
    return [("", model)]


def run_model(model: nn.Module, args: tuple, kwargs: dict):
    """``model(*args, **kwargs)`` with ``use_cache=False`` where its forward takes it, so no
    key/value cache is built while calibrating."""
    if _accepts(model, "use_cache") or "use_cache" in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return model(*args, **kwargs)


def first_output(out):
    """The hidden state of a block's output (first element of a tuple/list)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, block: nn.Module, calls: list[tuple[tuple, dict]],
                   progress: bool = False) -> list[tuple[tuple, dict]]:
    """Run ``model`` on every calibration call and record the ``(args, kwargs)`` that reach
    ``block``, stopping the forward there (a progress bar over the batches if ``progress``)."""
    if block is model:
        return list(calls)
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        # A key/value cache would grow each time the block is re-run on these inputs.
        kwargs = {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}
        captured.append((tuple(args), kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in tqdm(calls, desc="calibrate", unit="batch", disable=not progress, leave=False):
            try:
                run_model(model, args, kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calls):
        raise ValueError("a block was not called during the forward pass; pass `blocks=` with modules the forward uses")
    return captured


@torch.no_grad()
def propagate(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Next block's inputs: this block's output replaces the first argument. The list is
    updated in place, so a block's inputs and outputs are never all held at once."""
    for i, (args, kwargs) in enumerate(inputs):
        hidden = first_output(block(*args, **kwargs))
        inputs[i] = ((hidden, *args[1:]), kwargs)
    return inputs


def run_chain(blocks: Sequence[nn.Module], args: tuple, kwargs: dict):
    """Feed ``args``/``kwargs`` through ``blocks`` in order (until a hook stops it); a block
    held on another device (see ``prune(device=...)``) gets its inputs moved there (an
    offloaded one, on the meta device, has accelerate hooks that move them), and a block held
    in a float32 working copy of a half-precision model gets them in float32. The first block
    may be called with keywords only (a whole model fed mapping batches); the chain's later ones
    take the previous output first (:mod:`.links`)."""
    from .runtime.placement import as_dtype_of

    for block in blocks:
        dev = module_device(block)
        first = first_input((args, kwargs))
        if dev is not None and dev.type != "meta" and isinstance(first, torch.Tensor) and first.device != dev:
            args, kwargs = to_device(args, dev), to_device(kwargs, dev)
        args, kwargs = as_dtype_of(block, (args, kwargs))
        hidden = first_output(block(*args, **kwargs))
        args = (hidden, *args[1:])
    return args[0]


@torch.no_grad()
def execution_order(block: nn.Module, layers: dict[str, nn.Module], args: tuple, kwargs: dict) -> tuple[list[str], list[str]]:
    """Names of ``layers`` in the order ``block`` calls them on one input, and the names of
    those it never calls."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n) if n not in order else None) for n, m in layers.items()]
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order, [n for n in layers if n not in order]


@torch.no_grad()
def called_before(model: nn.Module, block: nn.Module, layers: dict[str, nn.Module], args: tuple,
                  kwargs: dict) -> list[str]:
    """Names of ``layers`` that ``model`` runs on one input before it reaches ``block`` (its
    front: an audio encoder's convolutions, a patch embedding), in the order it runs them."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n) if n not in order else None)
               for n, m in layers.items()]

    def stop(*_):
        raise StopForward

    handles.append(block.register_forward_pre_hook(stop))
    try:
        run_model(model, args, kwargs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def shared_input_groups(block: nn.Module, layers: dict[str, nn.Module], order: list[str], args: tuple,
                        kwargs: dict) -> tuple[list[list[str]], bool]:
    """``order`` cut into runs of consecutive layers that read the very same input tensor (a
    transformer's q/k/v, an MLP's gate/up), and whether every layer runs exactly once per
    call. Pruning one layer of a run cannot change the inputs of the others, so their
    statistics can be gathered in one pass, exactly."""
    seen: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(order, 0)

    def hook(name):
        def record(_module, inputs):
            calls[name] += 1
            if name not in seen and inputs and isinstance(inputs[0], torch.Tensor):
                seen[name] = inputs[0]
        return record

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in order]
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in order:
        previous = groups[-1][-1] if groups else None
        if previous is not None and name in seen and seen.get(previous) is seen[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, all(c == 1 for c in calls.values())


@contextlib.contextmanager
def swapped_weights(layers: dict[str, nn.Module], weights: dict[str, torch.Tensor | dict[str, torch.Tensor]]
                    ) -> Iterator[None]:
    """Temporarily give ``layers`` the given weights (e.g. their dense originals): a tensor
    replaces ``weight``, a mapping replaces each named parameter (``{"out_proj.weight": w}``)."""
    params = [(layers[n].get_parameter(p), w) for n, ws in weights.items()
              for p, w in (ws.items() if isinstance(ws, dict) else [("weight", ws)])]
    saved = [(param, param.data) for param, _ in params]
    try:
        for param, w in params:
            param.data = w
        yield
    finally:
        for param, w in saved:
            param.data = w
