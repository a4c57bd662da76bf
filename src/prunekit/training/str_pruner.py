"""STR (Kusupati et al., ICML 2020, arXiv 2002.03231): learnable per-layer soft thresholds, the LATS baseline.

Each prunable layer gets a scalar ``s_l``; the forward uses
``w = sign(theta) * relu(|theta| - sigmoid(s_l))`` with the *true* autograd gradient, so pruned
entries get no loss gradient. The ``s_l`` live in the pruner (the model's state_dict keys do not
change) and are added to the user's optimizer as one extra parameter group -- create the pruner
before any LR scheduler and before loading an optimizer checkpoint. Under DDP their gradients are
averaged across ranks in an optimizer pre-step hook. Sparsity emerges from ``s_init`` and the
weight decay; there is no target. Under FSDP2 the thresholds stay plain tensors (replicated, their
gradients averaged as under DDP) and ``final_sparsity`` counts over all shards.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..sparsity import sharding
from ..sparsity.allocation import check_sparsity
from ..sparsity.masks import MaskSet
from .base import PrunerBase, magnitude_projection, world_size


class STR(PrunerBase):
    """Soft Threshold Reparameterization: ``d_l = sigmoid(s_l)`` learned by the optimizer.

    ``s_weight_decay`` is the weight decay of the thresholds' parameter group (default: the
    optimizer's default). ``final_sparsity=s`` makes ``finalize()`` project to an exact global count
    by magnitude (a prunekit extension for matched-sparsity comparisons). ``sync=True``: under DDP the
    thresholds' gradients are averaged over the ranks, so every rank learns the same thresholds.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, s_init: float = -5.0,
                 s_weight_decay: float | None = None, final_sparsity: float | None = None, targets=None,
                 auto_step: bool = False, sync: bool = True) -> None:
        if final_sparsity is not None:
            check_sparsity(final_sparsity, "final_sparsity")
        super().__init__(model, optimizer, targets, sync)
        self.final_sparsity = final_sparsity
        self.s = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.tensor(float(s_init)))
                                   for n in self.weights})
        group: dict[str, Any] = {"params": list(self.s.values())}
        if s_weight_decay is not None:
            group["weight_decay"] = s_weight_decay
        optimizer.add_param_group(group)
        self._s_group = optimizer.param_groups[-1]
        for n in self.weights:
            self._shadow(n, partial(self._soft_threshold, n))
        if sync:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.synchronize()))
        if auto_step:
            self._attach_auto_step()

    def _soft_threshold(self, name: str, theta: torch.Tensor) -> torch.Tensor:
        """``sign(theta) * relu(|theta| - sigmoid(s_l))`` with its true gradient."""
        return torch.sign(theta) * torch.relu(theta.abs() - torch.sigmoid(self.s[name.replace(".", "/")]))

    def synchronize(self) -> None:
        """Average the thresholds' gradients over the ranks (before each optimizer step); a no-op in
        one process."""
        if world_size() > 1:
            for p in self.s.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world_size())

    def thresholds(self) -> dict[str, float]:
        """Current ``d_l = sigmoid(s_l)`` per layer."""
        return {n: float(torch.sigmoid(self.s[n.replace(".", "/")].detach())) for n in self.weights}

    @torch.no_grad()
    def masks(self) -> MaskSet:
        """Entries currently non-zero in the forward (``|theta| > d_l``; after ``finalize()``, ``w != 0``)."""
        d = dict.fromkeys(self.weights, 0.0) if self.finalized else self.thresholds()
        return MaskSet({n: w.abs() > d[n] for n, w in self.weights.items()})

    def step(self) -> None:
        """Call once after every ``optimizer.step()`` (the thresholds are learned by the optimizer)."""
        self._check_live()
        self.step_count += 1

    @torch.no_grad()
    def _finalize(self) -> MaskSet:
        """Write ``weight = S_d(theta)`` (projected to ``final_sparsity`` if given) and remove the
        thresholds' optimizer group; returns the masks (the non-zeros)."""
        d = self.thresholds()
        for n, w in self.weights.items():
            w.sub_(w.clamp(-d[n], d[n]))
        if self.final_sparsity is not None:
            keep = magnitude_projection({n: w.abs() for n, w in self.weights.items()}, self.final_sparsity, "global")
            for n, w in self.weights.items():
                sharding.local(w).mul_(sharding.local(keep[n]))
        self.optimizer.param_groups.remove(self._s_group)
        for p in self.s.values():
            self.optimizer.state.pop(p, None)
        return MaskSet({n: w != 0 for n, w in self.weights.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "s": {n: p.detach().clone() for n, p in self.s.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        with torch.no_grad():
            for n, p in self.s.items():
                p.copy_(state["s"][n])
        self.step_count = int(state["step"])
