"""Which parameters are prunable: one rule for ``prune``, the training pruners, reports and the CLI.

A *target* is a module whose weights prunekit may sparsify: one of the module types of the
registered layer kinds (:mod:`prunekit.layers`: Linear, Conv1d/Conv2d, MultiheadAttention,
transformers' Conv1D); ``types=None`` takes them all (what ``prune`` and the training pruners
use), the default ``DEFAULT_TYPES`` the Linear and convolution ones. Embeddings, norms and biases are never
targets, a weight tied to an embedding is never a target,
and the model's output layer (its *head*) is left dense unless asked for, because pruning it
hurts most and saves least (SparseGPT and Wanda leave it dense too).

The head is found by structure, not by name: the output embedding of a Hugging Face model
(``get_output_embeddings()``), else the last prunable layer to run in one forward of example
inputs when there are some, else the last prunable layer registered. ``torch.compile`` and
DistributedDataParallel wrappers are looked through.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..calls import as_call, eval_mode, model_device, to_device
from .base import check_types, kind_of, prunable_types
from .routers import ROUTER_REASON, is_router

# The single-weight kinds (Linear, Conv1d/Conv2d). prune(), model_report() and the training
# pruners pass ``types=None``: every registered kind (attention, HF Conv1D, ...).
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
HEAD_REASON = "output layer (head), left dense by default; pass include_head=True to prune it"


@dataclass
class Targets:
    """The prunable layers by name (registration order), the layers left out with the reason
    (the head), and the head's name (None when the model has no prunable head)."""

    layers: "OrderedDict[str, nn.Module]"
    skipped: dict[str, str] = field(default_factory=dict)
    head: str | None = None


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The user's module inside ``torch.compile`` / DDP / DataParallel wrappers, and the prefix
    its module names carry in the wrapper's ``named_modules()``."""
    prefix = ""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model, prefix = inner, prefix + "_orig_mod."
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model, prefix = model.module, prefix + "module."
        else:
            return model, prefix


def as_patterns(names: str | Iterable[str] | None, what: str) -> list[re.Pattern]:
    """``include`` / ``exclude`` (a regex, several, or None) compiled; a bad one is a ValueError
    naming ``what``."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    try:
        return [re.compile(n) for n in names]
    except (re.error, TypeError) as exc:
        raise ValueError(f"{what} must be regular expressions of module names, got {names!r} ({exc})") from exc


def _written(module: nn.Module) -> list:
    """The parameters its layer kind writes (none when a weight is missing)."""
    try:
        return [p for p in kind_of(module).parameters(module).values() if p is not None]
    except AttributeError:
        return []


def _candidates(model: nn.Module, types: tuple[type[nn.Module], ...]) -> "OrderedDict[str, nn.Module]":
    """Modules of the prunable types with weights of their own (not tied to an embedding or to
    an earlier candidate, as attention's ``out_proj`` is to its attention), by name, in
    registration order."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        params = [id(p) for p in _written(module)]
        if not params or any(p in embedding_weights or p in seen for p in params):
            continue  # no weight, or tied to an embedding or to another target
        seen.update(params)
        out[name] = module
    return out


@torch.no_grad()
def forward_order(model: nn.Module, layers: "OrderedDict[str, nn.Module]", example_inputs: Any) -> list[str]:
    """Names of ``layers`` in the order of their last call in one forward of ``example_inputs``
    (a batch: tensor, tuple or mapping), in eval mode; layers never called are left out."""
    last: dict[str, int] = {}
    counter = iter(range(1 << 62))
    handles = [m.register_forward_hook(lambda *_, n=n: last.__setitem__(n, next(counter)))
               for n, m in layers.items()]
    inner, _ = unwrap(model)  # the plain module: no compilation, no DDP communication
    try:
        args, kwargs = as_call(to_device(example_inputs, model_device(inner)))
        with eval_mode(inner):
            inner(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return sorted(last, key=last.__getitem__)


def find_head(model: nn.Module, *, types: Sequence[type[nn.Module]] | None = None,
              example_inputs: Any = None) -> str | None:
    """The name of ``model``'s output layer if it is a prunable target, found by structure: a
    Hugging Face model's ``get_output_embeddings()`` or the last layer outside its ``base_model``
    (a base model such as ``BertModel`` has none), else the last module of a prunable type to
    run in one forward of ``example_inputs`` (a batch), else the last one registered. None when
    there is none or when it is tied to the input embedding (it is then no target anyway)."""
    types = prunable_types() if types is None else tuple(types)
    candidates = _candidates(model, types)
    inner, prefix = unwrap(model)
    get_output = getattr(inner, "get_output_embeddings", None)
    if callable(get_output):
        try:
            output = get_output()
        except (NotImplementedError, AttributeError):
            output = None
        if isinstance(output, nn.Module):
            return next((n for n, m in candidates.items() if m is output), None)
    # every module of the types, tied ones included: a tied LM head is the head, and no target
    typed = OrderedDict((n, m) for n, m in model.named_modules()
                        if isinstance(m, types) and _written(m))
    base = getattr(inner, "base_model", None)
    if isinstance(base, nn.Module) and hasattr(inner, "config"):  # transformers: the head is outside the body
        if base is inner:
            return None  # a base model (BertModel, LlamaModel) has no head
        body = {id(m) for m in base.modules()}
        typed = OrderedDict((n, m) for n, m in typed.items() if id(m) not in body)
    if not typed:
        return None
    order: list[str] = []
    if example_inputs is not None:
        try:
            order = forward_order(model, typed, example_inputs)
        except Exception:  # inputs that do not fit: the caller's own checks say so, clearly
            order = []
    last = order[-1] if order else next(reversed(typed))
    # a model that is one layer is pruned as such, not spared as its own head
    return last if last in candidates and last != prefix[:-1] else None


def prunable(
    model: nn.Module,
    *,
    types: Sequence[type[nn.Module]] | None = DEFAULT_TYPES,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    include_head: bool = False,
    example_inputs: Any = None,
) -> Targets:
    """The prunable layers of ``model`` and the head left out, with its reason (see
    :func:`find_targets`; ``example_inputs``, a batch, lets the head be found by one forward)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = prunable_types() if types is None else tuple(types)
    check_types(types)
    inc, exc = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    candidates = _candidates(model, types)
    # the head is the model's, whichever types are pruned: look for it among every prunable kind
    head = find_head(model, example_inputs=example_inputs)
    out = Targets(OrderedDict(), head=head if head in candidates else None)
    modules = dict(model.named_modules())
    for name, module in candidates.items():
        if inc and not any(p.search(name) for p in inc):
            continue
        if exc and any(p.search(name) for p in exc):
            continue
        if not inc and is_router(name, module, modules.get(name.rpartition(".")[0]) if name else None):
            out.skipped[name] = ROUTER_REASON
            continue
        if name == head and not include_head and not inc:
            out.skipped[name] = HEAD_REASON
            continue
        out.layers[name] = module
    return out


def find_targets(
    model: nn.Module,
    *,
    types: Sequence[type[nn.Module]] | None = DEFAULT_TYPES,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    include_head: bool = False,
    example_inputs: Any = None,
) -> "OrderedDict[str, nn.Module]":
    """Return the prunable modules of ``model`` by name, in registration order.

    ``include`` / ``exclude`` are regular expressions matched (``re.search``) against module
    names; ``include`` narrows the set (and may name the head), ``exclude`` removes from it. A
    module whose weight is tied to another target (a tied LM head) is never returned twice, and a
    head tied to an embedding is never returned at all. The head (see :func:`find_head`) is left
    out unless ``include_head``; ``example_inputs`` (one batch) finds it by one forward.
    """
    return prunable(model, types=types, include=include, exclude=exclude, include_head=include_head,
                    example_inputs=example_inputs).layers


def check_plain_weights(layers: "dict[str, nn.Module]") -> None:
    """Refuse layers already under ``torch.nn.utils.prune`` or ``torch.nn.utils.parametrize``:
    their forward reads ``weight_orig * weight_mask`` or a parametrization's output, not the
    ``weight`` prunekit would write, so the sparsity reported would not be the model's. A
    ``ValueError`` names the layer and how to make the old pruning permanent; nothing changes."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod

    for name, module in layers.items():
        where = f"model.get_submodule({name!r})"
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"layer {name!r} is under torch.nn.utils.parametrize ({', '.join(module.parametrizations)}); its "
                f"forward does not read the weight prunekit writes. Bake it in first with "
                f"torch.nn.utils.parametrize.remove_parametrizations({where}, 'weight'), or exclude the layer")
        if hasattr(module, "weight_orig") or any(isinstance(h, BasePruningMethod)
                                                 for h in module._forward_pre_hooks.values()):
            raise ValueError(
                f"layer {name!r} is already pruned with torch.nn.utils.prune (weight_orig/weight_mask); its "
                f"forward reads weight_orig * weight_mask, not the weight prunekit writes. Make the old pruning "
                f"permanent first with torch.nn.utils.prune.remove({where}, 'weight'), or exclude the layer")
