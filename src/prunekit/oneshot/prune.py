"""``prunekit.prune``: one-shot pruning of a trained model, block by block.

1. check the options (:class:`~.config.PruneConfig`), pick the prunable layers and a per-layer
   budget (:mod:`.plan`);
2. for each block, in order, on inputs from the already-pruned blocks before it: choose each
   layer's support with a registered :class:`~.registry.Method`, then optionally refit the
   surviving weights on that support with a :class:`~.registry.Refine` (:mod:`.pipeline`);
3. report per-layer sparsity (read from the tensors), reconstruction errors and time.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from . import registry
from .config import PruneConfig
from .pipeline import run
from .plan import make_plan
from .result import PruneResult
from .runtime.ranks import across_ranks


def __getattr__(name: str) -> tuple:
    """``METHODS`` / ``REFINES``: the registered names, read when asked (plugins included)."""
    if name == "METHODS":
        return registry.names("method")
    if name == "REFINES":
        return (None, *registry.names("refine"))
    raise AttributeError(name)


@across_ranks
def prune(model: nn.Module, calibration: Iterable[Any] | None = None, config: PruneConfig | None = None,
          **options: Any) -> PruneResult:
    """Prune ``model`` in place, one shot, and return a :class:`PruneResult`.

    The options are the fields of :class:`PruneConfig` (each documented there), given as
    keywords, as a ``config``, or both (the keywords change the config's values; an unknown
    keyword is a TypeError naming the closest option). The main ones:

    ``sparsity`` is the fraction of prunable weights to remove (implied by an N:M ``pattern``).
    ``method`` chooses the support and ``refine`` (optional) refits the kept weights; both are
    names in :mod:`prunekit.oneshot.registry`, and ``method_options`` / ``refine_options`` are
    mappings checked by that step's options class (e.g. ``refine_options={"k": 4}`` for SNOWS).
    ``budget`` is ``uniform``, ``global`` (optionally with a per-layer ``cap``) or ``erk``;
    ``overrides`` maps layer-name regexes to fixed sparsities; ``include`` / ``exclude`` /
    ``include_head`` / ``types`` choose the layers. A module holding several matrices
    (attention's q, k, v and out_proj, a grouped convolution's groups) is pruned matrix by
    matrix, each a "layer" of its own for budgets, ``overrides`` and the report.

    ``calibration`` is any iterable of input batches (tensor -> ``model(x)``, tuple ->
    ``model(*b)``, mapping -> ``model(**b)``); every method but plain magnitude needs it.
    ``input_key`` picks the model's input of each batch: ``input_key=0`` for a labelled loader's
    ``(x, y)`` pairs, a key of mapping batches, or a function of the batch. Only one
    block's inputs and one layer's statistics are held at a time. ``device`` is where the work
    runs (one block at a time is moved there and back; a model dispatched with accelerate is
    pruned where it is kept, block by block from its offload storage); ``stats_dtype`` is the
    precision of the statistics and solvers (float32 by default). Half-precision models stay in
    their dtype.

    ``exact=True`` keeps the requested number of non-zeros in every layer even where an input is
    zero on all calibration data (SparseGPT and the refines would zero its weights): those
    weights are chosen on their dense values and kept dense (:mod:`prunekit.oneshot.dead`); each
    ``LayerReport`` counts the dead columns. ``recalibrate_bn=True`` re-estimates BatchNorm
    running statistics on the calibration batches afterwards.

    Bad options or data are a ValueError or TypeError naming the option and the fix, raised
    before anything changes; on any error, including Ctrl-C, the model is restored exactly as it
    was, from originals saved to disk as each layer is first changed, so no copy is held.

    Under ``torchrun`` (an initialised default process group, gloo or nccl) every rank calls
    ``prune`` on the same model with the same options and ITS OWN calibration batches; the
    statistics are summed over the ranks, so every rank ends with the same weights as one
    process fed all the batches. ``shard_calibration=True`` instead lets every rank pass the
    same full list and keeps batches ``i`` with ``i % world_size == rank``. Ranks that disagree
    on the model or the options, or one that fails, stop every rank with the same error.

    A ``torch.compile``d model is pruned through the module it wraps (``model._orig_mod``): the
    result names its layers as that module does, and the compiled model runs the pruned weights.
    """
    if config is not None and not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a prunekit.PruneConfig, got {type(config).__name__}; pass options as "
                        "keywords or build one with prunekit.PruneConfig(...)")
    config = (config if config is not None else PruneConfig()).replace(**options)
    model = uncompiled(model)
    return run(model, make_plan(model, calibration, config))


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``model``.

    A compiled forward runs no forward hooks, so calibrating through the wrapper would see no
    layer run; the wrapped module shares its parameters with the wrapper, whose compiled code
    reads them on every call, so pruning it in place prunes what the compiled model runs."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model
