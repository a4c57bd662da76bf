"""What one unit of a structure costs, in parameters and in FLOPs, and what the layers holding the
structures cost in all: the currencies of ``params=`` and ``flops=`` targets.

The FLOPs model counts one multiply-add as 2 FLOPs, per token, for the layers that hold the
structures (a transformer's decoder/encoder layers):

* every matrix (a parameter with two or more dimensions) of those layers: ``2 * numel`` (norms and
  biases are left out: they are a rounding error next to the matrix products);
* every attention recognised in those layers (``q_proj``/``o_proj`` with a ``head_dim``): the score
  product ``q k^T`` and the value product ``softmax(.) v`` at the calibration sequence length
  ``L``, ``4 * head_dim * L`` per query head. ``L`` is the full length, not the causal average
  ``L / 2``: the dense kernels most runtimes use at prefill compute the whole square.

A unit's FLOPs are those of its weights (the producer rows and consumer columns it takes with it,
``2 *`` its weight count) plus, for a query head, its ``4 * head_dim * L``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..oneshot.blocks import capture_inputs
from .find import find_structures, out_features, producer_weight
from .units import Structure

MEASURES = ("params", "flops")


def unit_params(model: nn.Module, s: Structure, biases: bool = True) -> int:
    """Parameters one unit of ``s`` holds (its producer rows, consumer columns and, if ``biases``,
    the producers' bias entries)."""
    modules = dict(model.named_modules())
    total = 0
    producers = s.producers + (s.kv_producers if s.kind == "heads" and s.q_per_kv == 1 else ())
    for name in producers:  # a fused q/k/v producer gives s.fused rows per unit column
        weight, bias = producer_weight(modules[name])
        total += s.unit_size * s.fused * (weight.shape[1] + (1 if biases and bias is not None else 0))
    consumer = modules[s.consumer]
    total += s.unit_size * out_features(consumer)
    return total


def _parents(found: list[Structure]) -> list[str]:
    return sorted({s.owner.rsplit(".", 1)[0] if "." in s.owner else "" for s in found})


def layer_params(model: nn.Module, found: list[Structure]) -> int:
    """Parameters of the layers holding the structures: the owners' common parents (for a
    transformer, every decoder/encoder layer), without embeddings or heads outside them."""
    return _layer_total(model, found, lambda t: t.numel())


def _layer_total(model: nn.Module, found: list[Structure], size) -> int:
    modules = dict(model.named_modules())
    seen: set[int] = set()
    total = 0
    for p in _parents(found):
        for t in modules[p].parameters():
            if id(t) not in seen:
                seen.add(id(t))
                total += size(t)
    return total


def attention_sites(model: nn.Module, found: list[Structure]) -> list[Structure]:
    """Every recognised attention inside the layers holding ``found`` (pruned or not)."""
    parents = _parents(found)
    return [a for a in find_structures(model, ("heads",))
            if any(p == "" or a.owner.startswith(p + ".") for p in parents)]


def attention_length(model: nn.Module, found: list[Structure], calls: list[tuple[tuple, dict]]) -> int:
    """The sequence length ``L`` attention sees on the first calibration batch (0 when the layers
    hold no recognised attention, so no ``L`` is needed)."""
    sites = attention_sites(model, found)
    if not sites:
        return 0
    if not calls:
        raise ValueError("flops= counts the attention products at the calibration sequence length; pass "
                         "calibration batches (or use params=)")
    owner = model.get_submodule(sites[0].owner)
    if hasattr(owner, "batch_first"):  # nn.MultiheadAttention (or its drop-in) never calls out_proj: read its query
        with torch.no_grad():
            (args, kwargs), = capture_inputs(model, owner, calls[:1])
        query = args[0] if args else kwargs["query"]
        if query.dim() < 3:  # unbatched: [L, E]
            return int(query.shape[0])
        return int(query.shape[1] if owner.batch_first else query.shape[0])
    consumer = model.get_submodule(sites[0].consumer)
    with torch.no_grad():
        (args, _), = capture_inputs(model, consumer, calls[:1])
    x = args[0]
    return int(x.shape[-2]) if x.dim() >= 2 else 1


def unit_flops(model: nn.Module, s: Structure, seq_len: int) -> int:
    """FLOPs per token one unit of ``s`` costs (see the module's docstring)."""
    attention = 4 * s.unit_size * seq_len if s.kind == "heads" else 0
    return 2 * unit_params(model, s, biases=False) + attention


def layer_flops(model: nn.Module, found: list[Structure], seq_len: int) -> int:
    """FLOPs per token of the layers holding the structures (see the module's docstring)."""
    matrices = _layer_total(model, found, lambda t: 2 * t.numel() if t.dim() >= 2 else 0)
    products = sum(4 * a.unit_size * seq_len * a.units for a in attention_sites(model, found))
    return matrices + products


def unit_costs(model: nn.Module, found: list[Structure], measure: str, seq_len: int = 0) -> tuple[dict[str, int], int]:
    """``({owner: cost of one unit}, cost of the layers holding them)`` in ``measure``
    (``"params"`` or ``"flops"`` per token at ``seq_len``)."""
    if measure == "params":
        return {s.owner: unit_params(model, s) for s in found}, layer_params(model, found)
    if measure == "flops":
        return {s.owner: unit_flops(model, s, seq_len) for s in found}, layer_flops(model, found, seq_len)
    raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
