"""Models dispatched with accelerate (``cpu_offload``, ``disk_offload``, ``dispatch_model``).

An offloaded module keeps its weights on the meta device; its ``AlignDevicesHook`` loads them
from the hook's ``weights_map`` (CPU tensors, or ``.dat`` files in an offload folder) before
each forward and drops them after. One-shot pruning must read, change and keep a block's weights
across many forwards, so :func:`onloaded` loads one block onto the execution device with the
hooks told to leave it there, and on success writes the pruned weights back to the offload
storage (the model then stays as small in memory as the user dispatched it). This is what
llm-compressor does for offloaded models, with accelerate's own hooks; accelerate itself is
never imported here (the hooks are recognised by their attributes), so it stays optional.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...calls import align_hook, home_device, model_device  # noqa: F401 - re-exported
from ...layers.base import kind_of


def _offload_hook(module: nn.Module) -> Any | None:
    hook = align_hook(module)
    return hook if hook is not None and hook.offload and hook.weights_map is not None else None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place any part of ``model``."""
    return any(align_hook(m) is not None for m in model.modules())


class Storage:
    """Where each parameter a target's layer kind writes lives: the module itself, or an
    offload map. Parameters are named by their path in the model (``layer.weight``,
    ``attn.in_proj_weight``, ``attn.out_proj.weight``)."""

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
        self.targets = targets
        self.params: dict[str, tuple[nn.Module, str]] = {}  # parameter path -> (layer, name in the layer)
        self.by_layer: dict[str, list[str]] = {}
        self.offloaded: dict[str, tuple[Any, str]] = {}  # parameter path -> (hook, key in its weights_map)
        modules = dict(model.named_modules())
        for name, module in targets.items():
            self.by_layer[name] = []
            for pname in kind_of(module).parameters(module):
                path = f"{name}.{pname}" if name else pname
                self.params[path] = (module, pname)
                self.by_layer[name].append(path)
                parts = path.split(".")
                for cut in range(len(parts) - 1, -1, -1):  # the owning module first, then its ancestors
                    hook = _offload_hook(modules[".".join(parts[:cut])])
                    if hook is not None and (cut == len(parts) - 1 or hook.place_submodules):
                        self.offloaded[path] = (hook, ".".join(parts[cut:]))
                        break

    def keys(self, layer: str) -> list[str]:
        """The paths of the parameters of target ``layer``."""
        return self.by_layer[layer]

    def live(self, path: str) -> nn.Parameter:
        """The parameter as the module holds it now (on the meta device while offloaded)."""
        module, pname = self.params[path]
        return kind_of(module).parameters(module)[pname]

    def read(self, path: str) -> torch.Tensor:
        """The parameter as stored (an offloaded one is read from its storage)."""
        if path in self.offloaded:
            hook, key = self.offloaded[path]
            return hook.weights_map[key]
        return self.live(path).detach()

    @torch.no_grad()
    def write(self, path: str, value: torch.Tensor) -> None:
        """Write ``value`` where the parameter is kept (the module, or its offload storage)."""
        if path in self.offloaded:
            hook, key = self.offloaded[path]
            store(hook.weights_map, key, value)
        else:
            self.live(path).copy_(value)


@torch.no_grad()
def store(weights_map: Mapping, key: str, value: torch.Tensor) -> None:
    """Write ``value`` into accelerate's offload storage: in place into a CPU tensor or into the
    ``.dat`` memory map of a disk offload; a weight read from the user's own checkpoint file is
    never written there, it gets a new ``.dat`` file in the offload folder instead."""
    while hasattr(weights_map, "prefix") and hasattr(weights_map, "dataset"):  # PrefixedDataset
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    value = value.detach().to("cpu")
    memory = getattr(weights_map, "state_dict", weights_map)  # OffloadedWeightsLoader or a dict
    if key in memory:
        memory[key].copy_(value)
        return
    info = weights_map.index[key]
    folder = weights_map.save_folder
    if info.get("safetensors_file") is not None:
        if folder is None:
            raise ValueError(f"{key!r} is read from a checkpoint file and no offload folder exists to write "
                             "the pruned weight to; dispatch the model with an offload_folder")
        from accelerate.utils import offload_weight

        offload_weight(value.to(getattr(torch, info.get("dtype", str(value.dtype).replace("torch.", "")))),
                       key, folder, index=weights_map.index)
        return
    raw = value.view(torch.int16) if info["dtype"] == "bfloat16" else value
    dtype = "int16" if info["dtype"] == "bfloat16" else info["dtype"]
    mm = np.memmap(os.path.join(folder, f"{key}.dat"), dtype=dtype, mode="r+", shape=tuple(info["shape"]) or (1,))
    mm[:] = raw.numpy().reshape(mm.shape)
    mm.flush()
    del mm


@contextlib.contextmanager
def onloaded(modules: Sequence[nn.Module], device: torch.device, storage: Storage,
             write_back: Sequence[str] = ()) -> Iterator[None]:
    """Load the offloaded parts of ``modules`` onto ``device`` and keep them there for the
    duration (their hooks neither reload nor drop them, and run on ``device``). On success the
    layers named in ``write_back`` are written to their offload storage; on error nothing is
    written (the caller restores). Every hook gets its settings back and the weights go back
    to the meta device either way. A no-op for modules without accelerate hooks."""
    hooked = [(m, h) for top in modules for m in top.modules() if (h := align_hook(m)) is not None]
    loaded, saved = [], [(h, h.execution_device, h.offload) for _, h in hooked]
    ok = False
    try:
        for m, h in hooked:
            h.execution_device = device
            if h.offload and h.weights_map is not None:
                h.pre_forward(m)  # accelerate's own loading (tied weights included)
                h.offload = False
                loaded.append((m, h))
            else:  # a part the hook keeps on a device: it moves with the block
                for t in [*m.parameters(recurse=h.place_submodules), *m.buffers(recurse=h.place_submodules)]:
                    if not t.is_meta and t.device != device:
                        raise ValueError(f"a dispatched module keeps its weights on {t.device}, not on the "
                                         f"execution device {device}; pass device={str(t.device)!r} or omit device")
        yield
        ok = True
    finally:
        try:
            if ok:
                for name in write_back:
                    for path in storage.keys(name):
                        if path in storage.offloaded:
                            storage.write(path, storage.live(path))
        finally:
            for m, h in reversed(loaded):
                h.offload = True
                h.post_forward(m, None)  # weights back to the meta device
            for h, dev, off in saved:
                h.execution_device, h.offload = dev, off
