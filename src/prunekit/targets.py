"""Which parameters are prunable.

A *target* is a module whose weights prunekit may sparsify: one of the module types of the
registered layer kinds (:mod:`prunekit.layer_kinds`: Linear, Conv1d/Conv2d, MultiheadAttention,
transformers' Conv1D); ``types=None`` takes them all, the default ``DEFAULT_TYPES`` the Linear
and convolution ones; embeddings, norms and biases are never targets, and a
final classifier / LM head is excluded unless asked for, because pruning it hurts most and
saves least.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Sequence

from torch import nn

from .layer_kinds import check_types, kind_of, prunable_types

# The single-weight kinds (Linear, Conv1d/Conv2d): what the training pruners handle. prune()
# and model_report() pass ``types=None``: every registered kind (attention, HF Conv1D, ...).
DEFAULT_TYPES: tuple[type[nn.Module], ...] = prunable_types()[:3]
# Names that mark an output head, matched against the last component of the LAST prunable
# layer's name only: "lm_head"/"output_projection" (LLMs), "classifier"/"head"/"score"
# (transformers' sequence-classification heads), "fc" (torchvision ResNets' final layer).
# Pruning the head hurts accuracy most and saves least (SparseGPT and Wanda leave it dense too).
HEAD_NAMES = ("lm_head", "classifier", "head", "fc", "score", "output_projection")


def _as_patterns(names: str | Iterable[str] | None, what: str) -> list[re.Pattern]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    try:
        return [re.compile(n) for n in names]
    except (re.error, TypeError) as exc:
        raise ValueError(f"{what} must be regular expressions of module names, got {names!r} ({exc})") from exc


def _is_final_head(model: nn.Module, name: str, module: nn.Module, candidates: Sequence[str]) -> bool:
    """The last prunable layer in registration order, if it is named like a head or is the
    last child of a sequential model (its output layer)."""
    if not candidates or name != candidates[-1]:
        return False
    leaf = name.rsplit(".", 1)[-1]
    if leaf in HEAD_NAMES or leaf.startswith("head"):
        return True
    if isinstance(model, nn.Sequential) and len(model):
        last = str(len(model) - 1)
        return name == last or name.startswith(last + ".")
    return False


def _written(module: nn.Module) -> list:
    """The parameters its layer kind writes (none when a weight is missing)."""
    try:
        return [p for p in kind_of(module).parameters(module).values() if p is not None]
    except AttributeError:
        return []


def find_targets(
    model: nn.Module,
    *,
    types: Sequence[type[nn.Module]] | None = DEFAULT_TYPES,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    include_head: bool = False,
) -> "OrderedDict[str, nn.Module]":
    """Return the prunable modules of ``model`` by name, in registration order.

    ``include`` / ``exclude`` are regular expressions matched (``re.search``) against module
    names; ``include`` narrows the set, ``exclude`` removes from it. A module whose weight is
    tied to another target (a tied LM head) is never returned twice, and a head tied to an
    embedding is never returned at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = prunable_types() if types is None else tuple(types)
    check_types(types)
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    candidates: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        params = [id(p) for p in _written(module)]
        if not params or any(p in embedding_weights or p in seen for p in params):
            continue  # no weight, or tied to an embedding or to another target (attention's out_proj)
        seen.update(params)
        candidates.append((name, module))
    names = [n for n, _ in candidates]
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, module in candidates:
        if inc and not any(p.search(name) for p in inc):
            continue
        if exc and any(p.search(name) for p in exc):
            continue
        if not include_head and not inc and _is_final_head(model, name, module, names):
            continue
        out[name] = module
    return out
