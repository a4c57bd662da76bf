"""``prunekit.prune``: one-shot pruning of a trained model, block by block.

1. pick the prunable layers and a per-layer budget;
2. for each block, in order, on inputs from the already-pruned blocks before it:
   choose each layer's support with a registered ``"select"`` method, then optionally refit
   the surviving weights on that support with a ``"refit"`` method
   (:mod:`prunekit.oneshot.registry`);
3. report per-layer sparsity (read from the tensors), reconstruction errors and time.

Only one block's inputs and one layer's statistics are held at a time. On any error,
including Ctrl-C, the model is restored exactly as it was, from originals saved to disk as each
layer is first changed (:mod:`prunekit.oneshot.restore`), so no copy of the model is held.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import allocate, check_sparsity
from ..layer_kinds import LayerKind, kind_of
from ..patterns import NM, Unstructured, parse_pattern
from ..targets import DEFAULT_TYPES, find_targets
from . import registry
from .blocks import capture_inputs, execution_order, find_blocks, forward_until, propagate, shared_input_groups
from ..calls import to_device
from .calibration import collect_batches
from .offload import Storage, home_device, is_dispatched, onloaded
from .placement import exact_float32, execution_device, peak_memory_tracker, stats_precision, to_block_device
from .legacy import legacy_options
from .lstsq import reconstruction_error
from .registry import LayerContext, LayerProblem, Refit, Selector, Update
from .restore import RestorePoint
from .result import LayerReport, PruneResult
from .selection import magnitude_scores
from .stats import LayerStats, gather_stats


def __getattr__(name: str) -> tuple:
    """``METHODS`` / ``REFINES``: the registered names, read when asked (plugins included)."""
    if name == "METHODS":
        return registry.names("select")
    if name == "REFINES":
        return (None, *registry.names("refit"))
    raise AttributeError(name)


def prune(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    pattern: str | NM | Unstructured = "unstructured",
    method: str = "magnitude",
    refine: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    refine_options: Mapping[str, Any] | None = None,
    budget: str = "uniform",
    cap: float | None = None,
    overrides: Mapping[str, float] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    include_head: bool = False,
    types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
    blocks: Sequence[str] | None = None,
    capture: str = "chain",
    sequential: bool = False,
    strict: bool = False,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    stats_dtype: str | torch.dtype | None = None,
    progress: bool | None = None,
    snows: Any = None,
    sparsegpt_block_size: int | None = None,
    damp: float | None = None,
    lstsq_damp: float | None = None,
) -> PruneResult:
    """Prune ``model`` in place, one shot, and return a :class:`PruneResult`.

    ``calibration`` is any iterable of input batches (tensor -> ``model(x)``, tuple ->
    ``model(*b)``, mapping -> ``model(**b)``); it is needed by every method but plain
    magnitude. ``sparsity`` is the fraction of prunable weights to remove (implied by an N:M
    ``pattern``). ``method`` chooses the support and ``refine`` (optional) refits the kept
    weights; both are names in :mod:`prunekit.oneshot.registry`, and ``method_options`` /
    ``refine_options`` are mappings validated by that method's options class (e.g.
    ``refine_options={"k": 4}`` for SNOWS). ``budget`` is ``uniform``, ``global``
    (optionally with a per-layer ``cap``) or ``erk``; ``overrides`` maps layer-name regexes to
    fixed sparsities. ``blocks`` names the modules calibrated in order (auto-detected by
    default); ``capture="rerun"`` re-runs the model to capture each block's inputs instead of
    chaining outputs, for models whose blocks do not feed each other directly.
    ``sequential=True`` recomputes statistics after every layer inside a block (always on for
    refits that fit against the dense target). ``snows``, ``sparsegpt_block_size``, ``damp``
    and ``lstsq_damp`` are deprecated spellings of the options mappings.

    ``device`` is where the work runs (e.g. ``"cuda"`` for a model kept in CPU memory): one
    block at a time is moved there with its inputs, pruned and moved back, so nothing else of
    the model is ever on that device (default: where the model is). ``stats_dtype`` is the
    precision of the calibration statistics and the solvers: ``float64`` by default on the
    CPU, ``float32`` on accelerators (as the SparseGPT reference does). A model dispatched with
    accelerate (``cpu_offload``, ``disk_offload``, ``dispatch_model``) is pruned where it is
    kept: each block is loaded from its offload storage and its pruned weights are written back
    there. Half-precision models stay in their dtype (statistics in ``stats_dtype``).
    """
    method_options, refine_options = legacy_options(
        method, refine, method_options, refine_options,
        snows=snows, sparsegpt_block_size=sparsegpt_block_size, damp=damp, lstsq_damp=lstsq_damp)
    selector, refit, pattern, sparsity = _check_args(method, refine, method_options, refine_options,
                                                     pattern, sparsity, capture)
    exec_device = execution_device(device)
    home = home_device(model)  # a model dispatched with accelerate may hold no weight in memory
    run_device = exec_device or home
    precision = stats_precision(stats_dtype, run_device)
    targets = find_targets(model, types=types, include=include, exclude=exclude, include_head=include_head)
    if not targets:
        raise ValueError("the model has no prunable layer; check `types`, `include` and `exclude`")
    storage = Storage(model, targets)
    _check_weights(targets, storage)
    skipped = _skip_misfits(targets, pattern, strict)
    if not targets:
        raise ValueError(f"no layer fits pattern {pattern}: {skipped}")
    needs_data = bool(selector.needs | (refit.needs if refit else frozenset()))
    calls = collect_batches(calibration, max_batches) if needs_data else []
    if isinstance(pattern, NM):
        budgets = {n: pattern.sparsity for n in targets}
    else:
        # Only a global budget ranks weights; uniform and ERK need shapes alone (no copy).
        scores = {n: magnitude_scores(storage.read(n)) if budget == "global" else m.weight.detach()
                  for n, m in targets.items()}
        budgets = allocate(scores, sparsity, budget, cap=cap, overrides=overrides)
        del scores

    result = PruneResult(method, refine, str(pattern), pattern.sparsity if isinstance(pattern, NM) else sparsity,
                         skipped=skipped, device=str(run_device), stats_dtype=str(precision).replace("torch.", ""))
    job = _Job(model, targets, budgets, pattern, selector, refit, sequential, result)
    job.home, job.device, job.dtype, job.storage = home, run_device, precision, storage
    job.dispatched = is_dispatched(model)
    was_training = model.training
    start = time.perf_counter()
    bar = tqdm(total=len(targets), desc=f"prune {method}" + (f"+{refine}" if refine else ""), unit="layer",
               disable=(not progress) if progress is not None else None, leave=False)
    job.bar = bar
    job.show_progress = not bar.disable
    tracker = peak_memory_tracker(run_device)
    try:
        model.eval()
        # Only the target weights ever change: each is saved to disk just before its first change.
        with RestorePoint(storage.write) as job.saved:
            if needs_data:
                with exact_float32(run_device):
                    job.run_calibrated(calls, blocks, capture)
            else:
                for name in targets:
                    with job.on_device([targets[name]], [name]) if job.dispatched else contextlib.nullcontext():
                        job.prune_layer(name, None)
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    result.peak_device_mib = tracker()
    return result


class _Job:
    """The state of one prune() call: which layers, what budgets, what is done."""

    def __init__(self, model, targets, budgets, pattern, selector: Selector, refit: Refit | None, sequential,
                 result) -> None:
        self.model, self.targets, self.budgets, self.pattern = model, targets, budgets, pattern
        self.selector, self.refit = selector, refit
        needs = selector.needs | (refit.needs if refit else frozenset())
        self.want_h = "hessian" in needs
        self.sequential = sequential or bool(needs & {"dense_target", "sequential"})
        self.result = result
        self.target_ids = {id(m) for m in targets.values()}
        self.home = self.device = torch.device("cpu")
        self.dtype = torch.float64
        self.bar = None
        self.show_progress = False
        self.saved: RestorePoint | None = None
        self.storage: Storage | None = None
        self.dispatched = False

    def on_device(self, modules, write_back=()):
        """``modules`` held on the execution device for the duration: moved there and back, or,
        for a model dispatched with accelerate, loaded from its offload storage and the pruned
        layers in ``write_back`` written back to it."""
        if self.dispatched:
            return onloaded(modules, self.device, self.storage, write_back)
        return to_block_device(modules, self.device, self.home)

    # -- block loop -------------------------------------------------------------------------
    def run_calibrated(self, calls, block_names, capture) -> None:
        blocks = find_blocks(self.model, block_names)
        calls = to_device(calls, self.home)  # the model's own front (embeddings) runs where it is
        _check_model_runs(self.model, calls[0], last_block=blocks[-1][1])
        owned = {n: self._owner(n, blocks) for n in self.targets}
        lookahead = self.refit is not None and "sequential" in self.refit.needs
        inputs = None
        for i, (bname, block) in enumerate(blocks):
            layers = {n: self.targets[n] for n in self.targets if owned[n] == i}
            if inputs is None or capture == "rerun":
                inputs = to_device(capture_inputs(self.model, block, calls, progress=self.show_progress), self.device)
            # A lookahead refit (SNOWS) reads on into the next block: it comes along to the device.
            ahead = [m for _, m in blocks[i + 1:i + 2]] if lookahead and layers else []
            with self.on_device([block, *ahead], list(layers)):
                if layers:
                    self.process_block(block, inputs, layers, chain=blocks[i:])
                if i + 1 < len(blocks) and capture == "chain":
                    inputs = propagate(block, inputs)
        rest = {n: self.targets[n] for n in self.targets if owned[n] is None}
        if rest:  # layers outside every block: the whole model is their block
            with self.on_device([self.model], list(rest)):
                self.process_block(self.model, to_device(calls, self.device), rest, chain=[("", self.model)])

    @staticmethod
    def _owner(name: str, blocks) -> int | None:
        for i, (bname, _) in enumerate(blocks):
            if bname == "" or name == bname or name.startswith(bname + "."):
                return i
        return None

    def process_block(self, block, inputs, layers, chain) -> None:
        order, uncalled = execution_order(block, layers, *inputs[0])
        for name in uncalled:  # e.g. nn.MultiheadAttention.out_proj, used functionally
            self.result.skipped[name] = "its forward is never called, so no calibration statistics exist"
            if self.bar is not None:
                self.bar.update()
        if not self.sequential:
            stats = gather_stats(block, inputs, {n: layers[n] for n in order}, want_h=self.want_h, dtype=self.dtype)
            for name in order:  # each layer's statistics freed once it is done
                self.prune_layer(name, stats.pop(name))
            return
        dense: dict[str, torch.Tensor] = {}
        # Layers reading the same input (q/k/v, gate/up) share one statistics pass: pruning one
        # of them cannot change the others' inputs, so this is exactly the layer-by-layer result.
        # Each forward also stops once the group's layers have run, when every layer runs once.
        groups, once = shared_input_groups(block, layers, order, *inputs[0])
        for group in groups:
            for name in group:
                dense[name] = layers[name].weight.detach().clone()
            stats = gather_stats(block, inputs, {n: layers[n] for n in group}, dense_weights=dense,
                                 all_layers=layers, stop_early=once, dtype=self.dtype)
            for name in group:
                self.prune_layer(name, stats.pop(name), inputs=inputs, chain=chain, block_layers=layers, dense=dense)

    # -- one layer --------------------------------------------------------------------------
    def prune_layer(self, name: str, stats: LayerStats | None, **ctx) -> None:
        t0 = time.perf_counter()
        layer, kind = self.targets[name], kind_of(self.targets[name])
        if self.saved is not None:
            self.saved.save(name, layer.weight)
        # never a view of the layer; on the execution device (a magnitude-only run moves no block)
        w0 = kind.matrix(layer).to(device=self.device, dtype=self.dtype, copy=True)
        report = LayerReport(name, tuple(layer.weight.shape), 0.0)
        problem = LayerProblem(name, w0, self.budgets[name], self.pattern, stats, self.selector,
                               self._context(layer, kind, ctx) if ctx else None)
        chosen = _checked(self.selector.select(problem), w0, self.selector)
        w, mask, notes = chosen.weight, chosen.mask, [chosen.note]
        has_h = stats is not None and stats.h_sum is not None
        if has_h:
            report.error_selected = self._error(w, w0, stats)
        if self.refit is not None:
            refitted = _checked(self.refit.refit(problem, chosen), w0, self.refit)
            w = refitted.weight
            notes.append(refitted.note)
            if refitted.lookahead is not None:
                report.lookahead_before, report.lookahead_after = refitted.lookahead
        self._write(layer, kind, w, mask)
        if self.refit is not None and has_h:
            report.error_refined = self._error(w * mask, w0, stats)
        report.note = "; ".join(n for n in notes if n)
        report.sparsity = float((layer.weight == 0).sum()) / layer.weight.numel()
        report.seconds = time.perf_counter() - t0
        # The promise, checked as each layer is written (later layers never touch this one), so
        # no mask is kept and memory does not grow with the number of layers.
        if kind.matrix(layer)[~mask.to(layer.weight.device)].any():
            raise RuntimeError(f"internal error: layer {name} has non-zero pruned entries")
        self.result.layers.append(report)
        if self.bar is not None:
            self.bar.update()

    def _context(self, layer: nn.Module, kind: LayerKind, ctx: dict) -> LayerContext:
        """What a network-level refit (SNOWS) needs of the current block."""
        return LayerContext(
            self.model, layer, ctx["chain"], ctx["inputs"], self.target_ids, ctx["block_layers"], ctx["dense"],
            write=lambda w, mask: self._write(layer, kind, w, mask),
            read=lambda: kind.matrix(layer).to(dtype=self.dtype, copy=True),
            weight_mask=lambda mask: kind.weight_mask(layer, mask),
            progress=self.show_progress,
        )

    @staticmethod
    def _write(layer: nn.Module, kind: LayerKind, w: torch.Tensor, mask: torch.Tensor) -> None:
        # torch.where writes +0.0 (w * mask would leave -0.0 behind negative pruned weights)
        kind.write(layer, torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)))

    @staticmethod
    def _error(w: torch.Tensor, w0: torch.Tensor, stats: LayerStats) -> float:
        return reconstruction_error(w, w0, stats.hessian, stats.cross, stats.hessian_target)

@torch.no_grad()
def _check_model_runs(model, call, last_block=None) -> None:
    """One forward on the first batch, up to the last calibrated block, so data that does not
    fit fails early and clearly (without computing an LM head's logits)."""
    args, kwargs = call
    try:
        forward_until(model, last_block, args, kwargs)
    except Exception as exc:
        raise ValueError(f"the model failed on the first calibration batch ({type(exc).__name__}: {exc}); "
                         "check that the batches match the model's inputs") from exc


def _checked(update: Update, w0: torch.Tensor, method: registry.Method) -> Update:
    """A method's answer, checked: a matrix like the layer's and, from a selector, a boolean
    keep-mask (a refit keeps the selector's)."""
    if not isinstance(update, Update) or update.weight.shape != w0.shape:
        raise TypeError(f"method {method.name!r} must return an Update with a weight of shape {tuple(w0.shape)}")
    mask = update.mask
    if method.role == "select" and (mask is None or mask.dtype != torch.bool or mask.shape != w0.shape):
        raise TypeError(f"method {method.name!r} must return a boolean keep-mask of shape {tuple(w0.shape)}")
    return update


def _check_args(method, refine, method_options, refine_options, pattern, sparsity, capture):
    """The selector and refit instances (options validated), the pattern and the sparsity."""
    if refine in ("none", "null"):
        refine = None
    selector = registry.get(method, "select")(method_options)
    refit = registry.get(refine, "refit")(refine_options) if refine is not None else None
    if refine is None and refine_options:
        raise ValueError(f"refine_options were given without refine; pass refine= one of "
                         f"{', '.join(registry.names('refit'))} (or drop them)")
    if capture not in ("chain", "rerun"):
        raise ValueError(f"capture must be 'chain' or 'rerun', got {capture!r}")
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        if sparsity is not None and abs(check_sparsity(sparsity) - pattern.sparsity) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts pattern {pattern} ({pattern.sparsity:g}); omit sparsity")
        return selector, refit, pattern, pattern.sparsity
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning, e.g. sparsity=0.5")
    return selector, refit, pattern, check_sparsity(sparsity)


def _check_weights(targets, storage: Storage) -> None:
    for name, module in targets.items():
        if module.weight.is_meta and name not in storage.offloaded:
            raise ValueError(f"layer {name!r} has its weight on the meta device (not materialised); load the "
                             "weights first (e.g. model.to_empty(device='cpu') then load_state_dict, or "
                             "from_pretrained without device_map='meta')")
        if not torch.isfinite(storage.read(name)).all():
            raise ValueError(f"layer {name!r} has NaN or Inf weights; fix the model before pruning")


def _skip_misfits(targets, pattern, strict: bool) -> dict[str, str]:
    skipped: dict[str, str] = {}
    for name, module in list(targets.items()):
        kind = kind_of(module)
        why = kind.why_not(module)
        if why is None and kind.units(module) != ("",):  # a kind with several matrices per module
            why = f"layer kind {kind.name!r} has several weight matrices per module; prune() takes one"
        elif why is None and isinstance(pattern, NM) and kind.matrix(module).shape[1] % pattern.m:
            why = f"input dimension {kind.matrix(module).shape[1]} is not a multiple of {pattern.m}"
        if why:
            if strict:
                raise ValueError(f"layer {name!r} cannot be pruned with pattern {pattern}: {why}; "
                                 f"exclude it (exclude={name!r}) or pass strict=False to skip it")
            warnings.warn(f"skipping layer {name!r}: {why}")
            skipped[name] = why
            del targets[name]
    return skipped
