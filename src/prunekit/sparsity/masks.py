"""A set of keep-masks keyed by the module name of each prunable layer.

A key is a module name (its ``weight``) or, for a module holding several pruned parameters
(``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj.weight``), a parameter path
(``attn.in_proj_weight``): the names the training pruners give their masks."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Mapping

import torch
from torch import nn

from . import sharding


class MaskSet:
    """Boolean keep-masks (True = weight survives) for named layers of one model."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self._masks: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, mask in (masks or {}).items():
            self[name] = mask

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._masks[name] = mask.detach().to(torch.bool)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    @classmethod
    def from_model(cls, model: nn.Module, names: list[str]) -> "MaskSet":
        """Masks read from the non-zeros of each named layer's weight."""
        modules = dict(model.named_modules())
        return cls({n: weight_of(model, n, modules).detach() != 0 for n in names})

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked-out weight of ``model`` in place."""
        modules = dict(model.named_modules())
        for name, mask in self._masks.items():
            weight = weight_of(model, name, modules)
            mask = sharding.local(sharding.shard_like(weight, mask))  # FSDP2: this rank's rows
            sharding.local(weight).masked_fill_(~mask.to(weight.device), 0.0)  # +0.0, never -0.0

    def verify(self, model: nn.Module) -> bool:
        """True when every masked-out weight of ``model`` is exactly zero."""
        modules = dict(model.named_modules())
        weights = [weight_of(model, n, modules).detach() for n in self._masks]
        ok = all(not sharding.local(w)[~sharding.local(sharding.shard_like(w, m)).to(w.device)].any()
                 for w, m in zip(weights, self._masks.values()))
        return sharding.all_ranks(ok, weights)

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masked tensors (for masks sharded by FSDP2, over
        all shards: the same value on every rank, and a collective every rank must call)."""
        total = sum(m.numel() for m in self._masks.values())
        kept = sharding.count_true(self._masks.values())
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self._masks) and self._masks:
            raise ValueError(f"mask names differ: missing {sorted(set(self._masks) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(self._masks))[:5]}")
        for name, mask in state.items():
            if name in self._masks and mask.shape != self._masks[name].shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(self._masks[name].shape)}")
            self[name] = mask


def weight_of(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
    """The weight a mask key names: module ``name``'s ``weight``, else the parameter at path
    ``name``; a KeyError naming the key otherwise (``modules``: ``dict(model.named_modules())``)."""
    modules = dict(model.named_modules()) if modules is None else modules
    if name in modules:
        return modules[name].weight
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise KeyError(f"mask {name!r} names neither a module nor a parameter of the model") from None
