"""SNOWS's options (:class:`SnowsOptions`): the Newton-CG settings plus the lookahead's.

They live below :mod:`prunekit.oneshot.methods` so that every refit by the K-step lookahead,
the mask refine (:class:`prunekit.oneshot.methods.snows.Snows`) and structured pruning's
``refine="snows"`` (:mod:`prunekit.structures.snows`), reads one definition.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import nn

from ..calls import first_input
from .lookahead import HVP_MODES
from .options import check_choice, check_int, check_number
from .solvers.newton_cg import NewtonCGConfig

WARM_STARTS = ("auto", "lstsq", "none")


@dataclass
class SnowsOptions(NewtonCGConfig):
    """The Newton-CG settings (:class:`NewtonCGConfig`), with ``epochs=1, max_cg=10`` for CPUs
    (the SNOWS reference used 3 epochs and up to 500 CG iterations; ``max_cg=10`` is what every
    accuracy benchmark under ``benchmarks/results`` ran with) and ``hessian_fraction="auto"``:
    HVPs on a quarter of each mini-batch in the convolutional blocks of a network fed large
    images (:func:`auto_hessian_fraction`: 224x224 CNNs, where it halves the refit and keeps a 50%
    MobileNet-class run under 15 minutes on 2 cores), on all of it otherwise (on a small ViT a
    quarter lost most of SNOWS's gain over SparseGPT and saved no time); and: ``k``, measured
    operations after the layer's own output; ``warm_start``: ``"auto"`` (least squares unless
    the method already updated the weights, as SparseGPT does), ``"lstsq"`` or ``"none"``;
    ``warm_start_damp``: its ridge term; ``measured``: which operations the loss compares
    (None: prunable layers, activations and attention; or a predicate ``(name, module) ->
    bool``; or a list of module types and name regexes); ``per_group``: refit each group of a
    grouped (depthwise) convolution on its own instead of all groups in one solve; ``hvp``: how
    CG's Hessian-vector products are computed, ``"exact"`` (double backward, Pearlmutter 1994) or
    ``"gauss_newton"`` (``J^T J v`` by a forward-mode JVP and one backward; the exact Hessian
    almost everywhere for ReLU networks with BatchNorm in eval mode, positive semi-definite
    otherwise)."""

    epochs: int = 1
    max_cg: int = 10
    hessian_fraction: float | str = "auto"
    k: int = 8
    warm_start: str = "auto"
    warm_start_damp: float = 1e-4
    measured: Any = None
    per_group: bool = False
    hvp: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be a non-negative integer (operations to look ahead), got {self.k!r}")
        check_choice(self.warm_start, "warm_start", WARM_STARTS)
        check_choice(self.hvp, "hvp", HVP_MODES)
        check_number(self.warm_start_damp, "warm_start_damp", 0.0)
        _check_measured(self.measured)
        for name in ("epochs", "max_cg", "max_backtracks"):
            check_int(getattr(self, name), name, 1)
        check_int(self.max_steps, "max_steps", 1, optional=True)
        check_int(self.patience, "patience", 0)
        check_number(self.cg_tol, "cg_tol", 0.0, low_open=True)
        check_number(self.damping, "damping", 0.0)
        check_number(self.armijo_c, "armijo_c", 0.0, 1.0, high_open=True)
        check_number(self.shrink, "shrink", 0.0, 1.0, low_open=True, high_open=True)
        check_number(self.stagnation, "stagnation", 0.0, low_open=True)
        if self.hessian_fraction != "auto":
            try:
                check_number(self.hessian_fraction, "hessian_fraction", 0.0, 1.0, low_open=True)
            except ValueError:
                raise ValueError("hessian_fraction must be 'auto' or a number in (0, 1], "
                                 f"got {self.hessian_fraction!r}") from None
        for name in ("relative_tol", "per_group"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def solver(self, inputs: Sequence[tuple[tuple, dict]] = (),
               model_input: tuple[int, ...] | None = None) -> NewtonCGConfig:
        """The solver settings, with ``hessian_fraction="auto"`` resolved for this block."""
        config = {f.name: getattr(self, f.name) for f in fields(NewtonCGConfig)}
        if config["hessian_fraction"] == "auto":
            config["hessian_fraction"] = auto_hessian_fraction(inputs, model_input)
        return NewtonCGConfig(**config)


#: elements per input image from which ``hessian_fraction="auto"`` subsamples the HVPs of
#: convolutional blocks (a 224x224 RGB image has 150,528; an MNIST digit 784)
LARGE_INPUT = 2 ** 16
#: the share of each batch the HVPs see when the input is large
AUTO_FRACTION = 0.25


def auto_hessian_fraction(inputs: Sequence[tuple[tuple, dict]], model_input: tuple[int, ...] | None) -> float:
    """0.25 for the convolutional blocks (``[B, C, H, W]`` inputs) of a network fed images of at
    least :data:`LARGE_INPUT` elements (``model_input``, one sample's shape: 3x224x224 is
    150,528), else 1.0. Measured: on a MobileNetV2-class CNN at 224x224 the quarter-batch
    Hessian halved the HVP time with the same lookahead loss, and its 28x28-and-smaller layers
    took 2.5x longer with whole batches; on a small ViT it lowered SparseGPT+SNOWS accuracy at
    70% from 95.25% to 90.50% and saved no time, so token sequences (transformers, LLMs) and
    small images keep whole batches (``benchmarks/results/snows_cost.md``)."""
    if not inputs or model_input is None or len(model_input) != 3 or math.prod(model_input) < LARGE_INPUT:
        return 1.0
    first = first_input(inputs[0])
    return AUTO_FRACTION if isinstance(first, torch.Tensor) and first.dim() == 4 else 1.0


def _check_measured(spec: Any) -> None:
    if spec is None or (callable(spec) and not isinstance(spec, type)):
        return
    if isinstance(spec, (list, tuple)) and spec:
        for item in spec:
            if isinstance(item, str):
                try:
                    re.compile(item)
                except re.error as exc:
                    raise ValueError(f"measured regex {item!r} is invalid ({exc})") from exc
            elif not (isinstance(item, type) and issubclass(item, nn.Module)):
                raise ValueError(f"measured entries must be nn.Module types or name regexes, got {item!r}")
        return
    raise ValueError("measured must be None, a predicate (name, module) -> bool, or a non-empty list of "
                     f"module types and name regexes, got {spec!r}")
