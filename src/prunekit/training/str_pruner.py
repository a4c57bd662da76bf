"""STR (Kusupati et al., ICML 2020): learnable per-layer soft thresholds, the LATS baseline.

Each prunable layer gets a scalar ``s_l``; the forward uses
``w = sign(theta) * relu(|theta| - sigmoid(s_l))`` with the *true* autograd gradient, so pruned
entries get no loss gradient. The ``s_l`` live in the pruner (the model's state_dict keys do not
change) and are added to the user's optimizer as one extra parameter group -- create the pruner
before any LR scheduler and before loading an optimizer checkpoint. Under DDP their gradients are
averaged across ranks in an optimizer pre-step hook. Sparsity emerges from ``s_init`` and the
weight decay; there is no target.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..masks import MaskSet
from .base import PrunerBase, drop_forward_weight, magnitude_projection, world_size


class STR(PrunerBase):
    """Soft Threshold Reparameterization: ``d_l = sigmoid(s_l)`` learned by the optimizer.

    ``s_weight_decay`` is the weight decay of the thresholds' parameter group (default: the
    optimizer's default). ``finalize(sparsity=...)`` optionally projects to an exact global count by
    magnitude (a prunekit extension for matched-sparsity comparisons).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, s_init: float = -5.0,
                 s_weight_decay: float | None = None, targets=None, auto_step: bool = False) -> None:
        super().__init__(model, optimizer, targets)
        self.s = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.tensor(float(s_init)))
                                   for n in self.targets})
        group: dict[str, Any] = {"params": list(self.s.values())}
        if s_weight_decay is not None:
            group["weight_decay"] = s_weight_decay
        optimizer.add_param_group(group)
        self._s_group = optimizer.param_groups[-1]
        for n, module in self.targets.items():
            self._hooks.append(module.register_forward_pre_hook(partial(self._pre_forward, n)))
            self._hooks.append(module.register_forward_hook(drop_forward_weight))
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._sync_grads()))
        if auto_step:
            self._attach_auto_step()

    def _pre_forward(self, name: str, module: nn.Module, args: Any) -> None:
        theta = module._parameters["weight"]
        module.__dict__["weight"] = torch.sign(theta) * torch.relu(theta.abs() - torch.sigmoid(self.s[name.replace(".", "/")]))

    def _sync_grads(self) -> None:
        if world_size() > 1:
            for p in self.s.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world_size())

    def thresholds(self) -> dict[str, float]:
        """Current ``d_l = sigmoid(s_l)`` per layer."""
        return {n: float(torch.sigmoid(self.s[n.replace(".", "/")].detach())) for n in self.targets}

    @torch.no_grad()
    def masks(self) -> MaskSet:
        d = self.thresholds()
        return MaskSet({n: w.abs() > d[n] for n, w in self.weights.items()})

    def sparsity(self) -> float:
        masks = self.masks()
        return 1.0 - sum(int(m.sum()) for _, m in masks.items()) / sum(m.numel() for _, m in masks.items())

    def step(self) -> None:
        """Call once after every ``optimizer.step()`` (the thresholds are learned by the optimizer)."""
        self._check_live()
        self.step_count += 1

    @torch.no_grad()
    def finalize(self, sparsity: float | None = None) -> MaskSet:
        """Write ``weight = S_d(theta)``, remove the hooks and the thresholds' optimizer group."""
        self._check_live()
        d = self.thresholds()
        self._remove_hooks()
        for module in self.targets.values():
            module.__dict__.pop("weight", None)
        for n, w in self.weights.items():
            w.sub_(w.clamp(-d[n], d[n]))
        if sparsity is not None:
            keep = magnitude_projection({n: w.abs() for n, w in self.weights.items()}, sparsity, "global")
            for n, w in self.weights.items():
                w.mul_(keep[n])
        self.optimizer.param_groups.remove(self._s_group)
        for p in self.s.values():
            self.optimizer.state.pop(p, None)
        self.finalized = True
        return MaskSet({n: w != 0 for n, w in self.weights.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "s": {n: p.detach().clone() for n, p in self.s.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        with torch.no_grad():
            for n, p in self.s.items():
                p.copy_(state["s"][n])
        self.step_count = int(state["step"])
