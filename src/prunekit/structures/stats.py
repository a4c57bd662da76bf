"""Statistics of a consumer's inputs, from the pruned model and (for a dense target) the dense one.

``H = X_s^T X_s / N``, ``C = X_s^T X_t / N``, ``T = X_t^T X_t / N`` and the column means, summed
batch by batch in float64 (each batch's product in the activations' dtype), so only one batch's
inputs are ever held.
"""
from __future__ import annotations

import torch
from torch import nn


class ConsumerStats:
    """Running sums of one consumer's inputs; ``dense``: also the dense model's inputs."""

    def __init__(self, d_in: int, dense: bool, device: torch.device | str = "cpu") -> None:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.dense = 0, dense
        self.h_sum, self.s_sum = z(d_in, d_in), z(d_in)
        self.c_sum = z(d_in, d_in) if dense else None
        self.t_sum = z(d_in, d_in) if dense else None
        self.st_sum = z(d_in) if dense else None

    def add(self, xs: torch.Tensor, xt: torch.Tensor | None = None) -> None:
        xs = xs.reshape(-1, xs.shape[-1])
        xs32 = xs.float() if xs.dtype in (torch.float16, torch.bfloat16) else xs
        self.count += xs.shape[0]
        self.h_sum += (xs32.T @ xs32).double()
        self.s_sum += xs32.double().sum(0)
        if self.dense:
            xt32 = xt.reshape(-1, xt.shape[-1]).to(xs32.dtype)
            self.c_sum += (xs32.T @ xt32).double()
            self.t_sum += (xt32.T @ xt32).double()
            self.st_sum += xt32.double().sum(0)

    def reduce(self, ranks) -> None:
        """Sum the running sums over ``ranks`` (a :class:`~prunekit.oneshot.runtime.ranks.Ranks`;
        nothing happens in one process), so each rank holds the statistics of all the batches."""
        if not ranks.active:
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.h_sum.device)
        sums = [t for t in (self.h_sum, self.s_sum, self.c_sum, self.t_sum, self.st_sum) if t is not None]
        ranks.sum(count, *sums)
        self.count = int(count.item())

    def _n(self) -> int:
        if not self.count:
            raise ValueError("the consumer saw no calibration rows; check that the block uses it")
        return self.count

    @property
    def hessian(self) -> torch.Tensor:
        return self.h_sum / self._n()

    @property
    def cross(self) -> torch.Tensor | None:
        return None if self.c_sum is None else self.c_sum / self._n()

    @property
    def target_gram(self) -> torch.Tensor | None:
        return None if self.t_sum is None else self.t_sum / self._n()

    @property
    def mean_s(self) -> torch.Tensor:
        return self.s_sum / self._n()

    @property
    def mean_t(self) -> torch.Tensor | None:
        return None if self.st_sum is None else self.st_sum / self._n()

    @property
    def sq_mean(self) -> torch.Tensor:
        return self.hessian.diagonal()

    @property
    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean_s ** 2).clamp_min(0)


class InputRecorder:
    """A forward pre-hook that keeps the last input a module received (detached)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        self.value = args[0].detach()

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise ValueError("the consumer was not called by its block; structures must be used in the forward")
        value, self.value = self.value, None
        return value

    def close(self) -> None:
        self.handle.remove()
