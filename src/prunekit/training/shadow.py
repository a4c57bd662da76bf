"""Per-forward weight shadowing: a layer computes with ``f(theta)`` while its parameter stays ``theta``.

The soft-threshold pruners train a dense latent ``theta`` (the module's own ``weight`` parameter, so
the optimizer and the state-dict keys are untouched) and run the forward on a thresholded copy. For
one forward, an instance attribute ``module.__dict__["weight"]`` shadows the parameter (Python finds
it before ``nn.Module.__getattr__`` looks in ``_parameters``); a forward hook registered with
``always_call=True`` removes it again, also when the forward raises, so ``module.weight`` never keeps
returning a stale thresholded tensor. (PyTorch runs such hooks for an ``Exception``; after a
``KeyboardInterrupt`` the next forward, or the pruner's ``finalize()``, puts the parameter back.)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def shadow_weight(module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                  owner: nn.Module | None = None, attr: str = "weight") -> list[RemovableHandle]:
    """Make every forward of ``module`` use ``transform(owner._parameters[attr])`` as ``owner.<attr>``
    (``owner`` defaults to ``module``; ``nn.MultiheadAttention`` reads ``out_proj.weight`` in its own
    forward, so that parameter is shadowed around the attention's forward).

    Returns the two hook handles; remove them (and call :func:`unshadow`) to detach.
    """
    owner = module if owner is None else owner

    def install(mod: nn.Module, args: Any) -> None:
        owner.__dict__[attr] = transform(owner._parameters[attr])

    def restore(mod: nn.Module, args: Any, output: Any) -> None:
        unshadow(owner, attr)

    return [module.register_forward_pre_hook(install), module.register_forward_hook(restore, always_call=True)]


def unshadow(module: nn.Module, attr: str = "weight") -> None:
    """Drop a shadowing weight, if any: ``module.<attr>`` is the parameter again."""
    module.__dict__.pop(attr, None)
