"""``prunekit.prune``: one-shot pruning of a trained model, block by block.

1. pick the prunable layers and a per-layer budget;
2. for each block, in order, on inputs from the already-pruned blocks before it:
   choose each layer's support with a registered :class:`~.registry.Method`, then optionally
   refit the surviving weights on that support with a :class:`~.registry.Refine`
   (:mod:`prunekit.oneshot.registry`);
3. report per-layer sparsity (read from the tensors), reconstruction errors and time.

Only one block's inputs and one layer's statistics are held at a time. On any error,
including Ctrl-C, the model is restored exactly as it was, from originals saved to disk as each
layer is first changed (:mod:`prunekit.oneshot.runtime.restore`), so no copy of the model is held. Under
torch.distributed every rank feeds its own calibration batches and the statistics are summed
(:mod:`.ranks`).
"""
from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..sparsity.allocation import allocate, check_sparsity
from .batchnorm import recalibrate_batchnorm
from ..layers.base import LayerKind, kind_of, unit_name
from ..layers.base import known as known_kinds
from ..sparsity.patterns import NM, Unstructured, parse_pattern
from ..layers.targets import HEAD_REASON, check_plain_weights, prunable
from . import registry
from .blocks import capture_inputs, execution_order, find_blocks, forward_until, propagate, shared_input_groups
from ..calls import first_input, to_device
from .calibration import collect_batches
from .runtime.ranks import Ranks, across_ranks, checksum, fingerprint, shard
from .runtime.offload import Storage, home_device, is_dispatched, onloaded
from .runtime.placement import exact_float32, execution_device, peak_memory_tracker, stats_precision, to_block_device
from .dead import dead_columns, keep_dead_dense
from .solvers.lstsq import reconstruction_error
from .registry import LayerContext, LayerProblem, Method, Refine, Update
from .runtime.restore import RestorePoint
from .result import LayerReport, PruneResult
from .solvers.selection import magnitude_scores
from .stats import LayerStats, gather_stats


def __getattr__(name: str) -> tuple:
    """``METHODS`` / ``REFINES``: the registered names, read when asked (plugins included)."""
    if name == "METHODS":
        return registry.names("method")
    if name == "REFINES":
        return (None, *registry.names("refine"))
    raise AttributeError(name)


@across_ranks
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
    types: Sequence[type[nn.Module]] | None = None,
    blocks: Sequence[str] | None = None,
    capture: str = "chain",
    sequential: bool = False,
    strict: bool = False,
    exact: bool = True,
    recalibrate_bn: bool = False,
    max_batches: int | None = None,
    shard_calibration: bool = False,
    device: str | torch.device | None = None,
    stats_dtype: str | torch.dtype | None = None,
    progress: bool | None = None,
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
    fixed sparsities. ``types`` narrows the layer types (default: every registered layer kind,
    :mod:`prunekit.layers.base`); a module holding several matrices (attention's q, k, v and
    out_proj, a grouped convolution's groups) is pruned matrix by matrix, each a "layer" of
    its own for budgets, ``overrides`` and the report. ``blocks`` names the modules calibrated
    in order (auto-detected by default); ``capture="rerun"`` re-runs the model to capture each block's inputs instead of
    chaining outputs, for models whose blocks do not feed each other directly.
    ``sequential=True`` recomputes statistics after every layer inside a block (always on for
    refines that fit against the dense target).

    ``device`` is where the work runs (e.g. ``"cuda"`` for a model kept in CPU memory): one
    block at a time is moved there with its inputs, pruned and moved back, so nothing else of
    the model is ever on that device (default: where the model is). ``stats_dtype`` is the
    precision of the calibration statistics and the solvers: ``float32`` by default (as the
    SparseGPT reference does; ``float64`` for a float64 model), ``"float64"`` on request. A
    model dispatched with accelerate (``cpu_offload``, ``disk_offload``, ``dispatch_model``) is pruned where it is
    kept: each block is loaded from its offload storage and its pruned weights are written back
    there. Half-precision models stay in their dtype (statistics in ``stats_dtype``).

    ``exact=True`` keeps the requested number of non-zeros in every layer even where an input is
    zero on all calibration data (SparseGPT and the refits would zero its weights): those weights
    are chosen on their dense values and kept dense (:mod:`prunekit.oneshot.dead`); each
    ``LayerReport`` counts the dead columns. ``exact=False`` is the reference behaviour, with the
    extra zeros reported in the summary.

    ``recalibrate_bn=True`` re-estimates every BatchNorm's running statistics on the
    calibration batches after pruning (:func:`prunekit.recalibrate_batchnorm`); it needs data.

    Under ``torchrun`` (an initialised default process group, gloo or nccl) every rank calls
    ``prune`` on the same model with the same arguments and ITS OWN calibration batches; the
    statistics are summed over the ranks, so every rank ends with the same weights as one
    process fed all the batches. ``shard_calibration=True`` instead lets every rank pass the
    same full list and keeps batches ``i`` with ``i % world_size == rank``. Ranks that disagree
    on the model or the arguments, or one that fails, stop every rank with the same error.
    """
    chooser, refiner, pattern, sparsity = _check_args(method, refine, method_options, refine_options,
                                                      pattern, sparsity, capture, exact, recalibrate_bn)
    exec_device = execution_device(device)
    home = home_device(model)  # a model dispatched with accelerate may hold no weight in memory
    run_device = exec_device or home
    stats_precision(stats_dtype)  # a bad value is refused before any work
    if isinstance(pattern, NM) and (budget != "uniform" or cap is not None or overrides):
        raise ValueError(f"pattern {pattern} fixes every layer's sparsity at {pattern.sparsity:g}; use budget='uniform' "
                         f"without cap or overrides (got budget={budget!r}, cap={cap!r}, overrides={overrides!r}), "
                         "and exclude= for layers to keep dense")
    needs_data = bool(chooser.needs | (refiner.needs if refiner else frozenset()))
    if recalibrate_bn and calibration is None:
        raise ValueError("recalibrate_bn=True re-estimates BatchNorm statistics on the calibration data; "
                         "pass calibration batches (or recalibrate_bn=False)")
    calls = collect_batches(calibration, max_batches) if needs_data or recalibrate_bn else []
    example = _first_batch(calls, calibration)
    found = prunable(model, types=types, include=include, exclude=exclude, include_head=include_head,
                     example_inputs=example)
    targets = found.layers
    _check_include(model, include, targets, types)
    if not targets:
        raise ValueError("the model has no prunable layer; check `types`, `include` and `exclude`"
                         + (f" (the only one is the head {found.head!r}: include_head=True)" if found.skipped else ""))
    check_plain_weights(targets)
    precision = stats_precision(stats_dtype, _widest_dtype(targets))
    storage = Storage(model, targets)
    _check_weights(targets, storage)
    skipped = {**found.skipped, **_skip_misfits(targets, pattern, strict)}
    if not targets:
        raise ValueError(f"no layer fits pattern {pattern}: {skipped}")
    # Each [d_out, d_in] matrix ("unit") of a target is a layer of its own from here on.
    units = {unit_name(n, u): (n, u) for n, m in targets.items() for u in kind_of(m).units(m)}
    ranks, n_calls = Ranks.current(), len(calls)
    if shard_calibration and needs_data:
        calls = shard(calls, ranks)
        if not calls:
            raise ValueError(f"shard_calibration=True shares {n_calls} calibration batches among {ranks.world} ranks, "
                             f"leaving rank {ranks.rank} none; pass at least {ranks.world} batches")
    if isinstance(pattern, NM):
        budgets = {k: pattern.sparsity for k in units}
    else:
        # Only a global budget ranks weights; uniform and ERK need shapes alone (no copy).
        scores = {k: _unit_scores(n, u, budget == "global", targets, storage) for k, (n, u) in units.items()}
        budgets = allocate(scores, sparsity, budget, cap=cap, overrides=overrides)
        budgets = _spread_within_modules(budgets, units, {k: t.numel() for k, t in scores.items()})
        del scores

    if ranks.active:
        args = dict(method=method, refine=refine, method_options=chooser.options, pattern=pattern,
                    refine_options=refiner.options if refiner else None, sparsity=sparsity, budget=budget, cap=cap,
                    overrides=overrides, include=include, exclude=exclude, include_head=include_head, types=types,
                    blocks=blocks, capture=capture, sequential=sequential, strict=strict, max_batches=max_batches,
                    device=run_device.type, stats_dtype=precision, shard_calibration=shard_calibration,
                    batches_before_sharding=n_calls if shard_calibration else None, skipped=skipped, exact=exact,
                    recalibrate_bn=recalibrate_bn)
        ranks.same("the arguments or the model", fingerprint(args, targets, budgets))
    result = PruneResult(method, refine, str(pattern), pattern.sparsity if isinstance(pattern, NM) else sparsity,
                         skipped=skipped, device=str(run_device), stats_dtype=str(precision).replace("torch.", ""),
                         exact=exact, processes=ranks.world if needs_data else 1)
    job = _Job(model, targets, units, budgets, pattern, chooser, refiner, sequential, result)
    job.home, job.device, job.dtype, job.exact, job.ranks = home, run_device, precision, exact, ranks
    job.storage, job.dispatched = storage, is_dispatched(model)
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    start = time.perf_counter()
    bar = tqdm(total=len(units), desc=f"prune {method}" + (f"+{refine}" if refine else ""), unit="layer",
               disable=True if ranks.rank else (not progress) if progress is not None else None, leave=False)
    job.bar = bar
    job.show_progress = not bar.disable
    tracker = peak_memory_tracker(run_device)
    try:
        model.eval()
        # nn.TransformerEncoderLayer's fast path never calls its attention module: no hook would fire.
        torch.backends.mha.set_fastpath_enabled(False)
        # Only the parameters the layer kinds write ever change: each is saved to disk just before
        # its first change, and written back from there on any failure.
        with RestorePoint(storage.write) as job.saved:
            if needs_data:
                with exact_float32(run_device):
                    job.run_calibrated(calls, blocks, capture)
            else:
                for key in units:
                    name = units[key][0]
                    with job.on_device([targets[name]], [name]) if job.dispatched else contextlib.nullcontext():
                        job.prune_layer(key, None)
            # a cheap last check that every rank wrote the very same weights
            if ranks.active:
                ranks.same("the pruned weights", {path: checksum(storage.read(path)) for path in storage.params},
                           error=RuntimeError, hint="the statistics were summed, so the ranks computed differently "
                                                    "(different libraries, thread counts or devices?)")
            if recalibrate_bn:  # only BatchNorm buffers change; restored by the helper itself on error
                result.bn_batches = recalibrate_batchnorm(model, [_first_batch([c], None) for c in calls])
    except BaseException as exc:
        if isinstance(exc, Exception) and not isinstance(exc, (ValueError, TypeError, torch.OutOfMemoryError)):
            _blame_batch(model, to_device(calls[1:], home), exc)  # only the first batch was checked up front
        raise
    finally:
        bar.close()
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    result.seconds = time.perf_counter() - start
    _warn_skipped(result.skipped)
    result.peak_device_mib = tracker()
    return result


class _Job:
    """The state of one prune() call: which layers, what budgets, what is done."""

    def __init__(self, model, targets, units, budgets, pattern, method: Method, refine: Refine | None, sequential,
                 result) -> None:
        self.model, self.targets, self.budgets, self.pattern = model, targets, budgets, pattern
        self.units: dict[str, tuple[str, str]] = units  # unit name -> (module name, unit)
        self.method, self.refine = method, refine
        needs = method.needs | (refine.needs if refine else frozenset())
        self.want_h = "hessian" in needs
        self.sequential = sequential or bool(needs & {"dense_target", "sequential"})
        self.result = result
        self.target_ids = {id(m) for m in targets.values()}
        self.home = self.device = torch.device("cpu")
        self.dtype = torch.float64
        self.exact = True
        self.ranks = Ranks()
        self.bar = None
        self.show_progress = False
        self.saved: RestorePoint | None = None
        self.storage: Storage | None = None
        self.dispatched = False
        self.model_input: tuple[int, ...] | None = None

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
        self.model_input = _sample_shape(calls[0])
        _check_model_runs(self.model, calls[0], last_block=blocks[-1][1])
        owned = {n: self._owner(n, blocks) for n in self.targets}
        lookahead = self.refine is not None and "sequential" in self.refine.needs
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
        self.ranks.same("the layers a block calls", {"order": order, "uncalled": uncalled})
        for name in uncalled:  # e.g. nn.MultiheadAttention.out_proj, used functionally
            self.result.skipped[name] = "its forward is never called, so no calibration statistics exist"
            if self.bar is not None:
                self.bar.update(len(kind_of(layers[name]).units(layers[name])))
        if not self.sequential:
            stats = gather_stats(block, inputs, {n: layers[n] for n in order}, want_h=self.want_h, dtype=self.dtype,
                                 ranks=self.ranks)
            for name in order:  # each layer's statistics freed once it is done
                for unit in kind_of(layers[name]).units(layers[name]):
                    self.prune_layer(unit_name(name, unit), stats.pop(unit_name(name, unit)))
            return
        dense: dict[str, dict[str, torch.Tensor]] = {}
        # Layers reading the same input (q/k/v, gate/up) share one statistics pass: pruning one
        # of them cannot change the others' inputs, so this is exactly the layer-by-layer result.
        # Each forward also stops once the group's layers have run, when every layer runs once.
        # A module's later stages (attention's out_proj after q, k, v) get passes of their own.
        groups, once = shared_input_groups(block, layers, order, *inputs[0])
        self.ranks.same("the layers a block calls", {"groups": groups, "once": once})
        for group in groups:
            for name in group:
                dense[name] = {p: t.detach().clone() for p, t in kind_of(layers[name]).parameters(layers[name]).items()}
            for stage in _stages(layers, group):
                stats = gather_stats(block, inputs, {n: layers[n] for n in stage}, units=stage, dense_weights=dense,
                                     all_layers=layers, stop_early=once, dtype=self.dtype, ranks=self.ranks)
                for name, names in stage.items():
                    for unit in names:
                        self.prune_layer(unit_name(name, unit), stats.pop(unit_name(name, unit)), inputs=inputs,
                                         chain=chain, block_layers=layers, dense=dense)

    # -- one layer --------------------------------------------------------------------------
    def prune_layer(self, key: str, stats: LayerStats | None, **ctx) -> None:
        """Prune one unit (``key``: its name, e.g. ``attn.in_proj_weight[q]``)."""
        t0 = time.perf_counter()
        name, unit = self.units[key]
        layer, kind = self.targets[name], kind_of(self.targets[name])
        if self.saved is not None:
            for path in self.storage.keys(name):
                self.saved.save(path, self.storage.live(path))
        # never a view of the layer; on the execution device (a magnitude-only run moves no block)
        w0 = kind.matrix(layer, unit).to(device=self.device, dtype=self.dtype, copy=True)
        report = LayerReport(key, kind.shape(layer, unit), 0.0)
        problem = LayerProblem(key, w0, self.budgets[key], self.pattern, stats, self.method,
                               self._context(layer, kind, unit, ctx) if ctx else None, exact=self.exact)
        chosen = _checked(self.method.choose(problem), w0, self.method)
        w, mask, notes = chosen.weight, chosen.mask, [chosen.note]
        has_h = stats is not None and stats.h_sum is not None
        if has_h:
            report.error_selected = self._error(w, w0, stats)
        if self.refine is not None:
            refitted = _checked(self.refine.refine(problem, chosen), w0, self.refine)
            w = refitted.weight
            notes.append(refitted.note)
            if refitted.lookahead is not None:
                report.lookahead_before, report.lookahead_after = refitted.lookahead
        dead = dead_columns(stats)
        if dead is not None:
            report.dead_columns = int(dead.sum())
            if self.exact and report.dead_columns:  # a refit zeroes them: the live part is what it fits
                w = keep_dead_dense(w, w0, mask, dead)
        self._write(layer, kind, unit, w, mask)
        if self.refine is not None and has_h:
            report.error_refined = self._error(w * mask, w0, stats)
        report.note = "; ".join(n for n in notes if n)
        written = kind.matrix(layer, unit)
        report.sparsity = float((written == 0).sum()) / written.numel()
        report.extra_zeros = int((written[mask.to(written.device)] == 0).sum())
        report.seconds = time.perf_counter() - t0
        # The promise, checked as each layer is written (later layers never touch this one), so
        # no mask is kept and memory does not grow with the number of layers.
        if written[~mask.to(written.device)].any():
            raise RuntimeError(f"internal error: layer {key} has non-zero pruned entries")
        self.result.layers.append(report)
        if self.bar is not None:
            self.bar.update()

    def _context(self, layer: nn.Module, kind: LayerKind, unit: str, ctx: dict) -> LayerContext:
        """What a network-level refine (SNOWS) needs of the current block."""
        param = kind.parameter(layer, unit)
        inside = kind.weight_mask(layer, torch.ones(kind.matrix(layer, unit).shape, dtype=torch.bool,
                                                    device=param.device), unit)
        return LayerContext(
            self.model, layer, ctx["chain"], ctx["inputs"], self.target_ids, ctx["block_layers"], ctx["dense"],
            write=lambda w, mask: self._write(layer, kind, unit, w, mask),
            read=lambda: kind.matrix(layer, unit).to(dtype=self.dtype, copy=True),
            weight_mask=lambda mask: kind.weight_mask(layer, mask, unit),
            progress=self.show_progress, ranks=self.ranks, model_input=self.model_input,
            parameter=param,
            frozen=None if bool(inside.all()) else ~inside,
        )

    @staticmethod
    def _write(layer: nn.Module, kind: LayerKind, unit: str, w: torch.Tensor, mask: torch.Tensor) -> None:
        # torch.where writes +0.0 (w * mask would leave -0.0 behind negative pruned weights)
        kind.write(layer, torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), unit)

    @staticmethod
    def _error(w: torch.Tensor, w0: torch.Tensor, stats: LayerStats) -> float:
        return reconstruction_error(w, w0, stats.hessian, stats.cross, stats.hessian_target)


def _widest_dtype(targets: dict[str, nn.Module]) -> torch.dtype:
    """float64 when any target holds a float64 matrix, else float32 (the statistics default)."""
    wide = any(t.dtype == torch.float64 for m in targets.values() for t in kind_of(m).parameters(m).values())
    return torch.float64 if wide else torch.float32


def _stages(layers: dict[str, nn.Module], group: list[str]) -> list[dict[str, tuple[str, ...]]]:
    """The statistics passes of a group of layers reading one input: every module's first-stage
    units together, then each later stage ({module name: units})."""
    stages = {n: kind_of(layers[n]).stages(layers[n]) for n in group}
    out = [{n: st[0] for n, st in stages.items()}]
    for i in range(1, max(len(st) for st in stages.values())):
        out.append({n: st[i] for n, st in stages.items() if i < len(st)})
    return out


def _spread_within_modules(budgets: dict[str, float], units, sizes: Mapping[str, int]) -> dict[str, float]:
    """Per-unit sparsities under which each module's units prune exactly ``round(s * n)`` of the
    module's ``n`` weights together when they share one sparsity ``s``: the remainder of each
    unit's ``s * n_u`` is spread by largest remainder (ties in unit order), so a depthwise conv of
    1x9 kernels at 50% is 50% sparse, not 4/9 everywhere."""
    by_module: dict[str, list[str]] = {}
    for key, (name, _) in units.items():
        by_module.setdefault(name, []).append(key)
    out = dict(budgets)
    for keys in by_module.values():
        s = budgets[keys[0]]
        if len(keys) < 2 or any(budgets[k] != s for k in keys):
            continue
        exact = {k: s * sizes[k] for k in keys}
        counts = {k: math.floor(v) for k, v in exact.items()}
        left = round(s * sum(sizes[k] for k in keys)) - sum(counts.values())
        for k in sorted(keys, key=lambda k: (-(exact[k] - counts[k]), keys.index(k)))[:max(left, 0)]:
            counts[k] += 1
        out.update({k: counts[k] / sizes[k] for k in keys})
    return out


def _unit_scores(name: str, unit: str, ranked: bool, targets, storage: Storage) -> torch.Tensor:
    """What a budget reads of a unit: its magnitudes (global ranking) or only its shape."""
    module = targets[name]
    kind = kind_of(module)
    if not ranked:
        return torch.empty(kind.shape(module, unit), device="meta")
    paths = storage.keys(name)
    if not any(storage.live(p).is_meta for p in paths):
        return magnitude_scores(kind.matrix(module, unit))
    if len(paths) == 1 and kind.units(module) == ("",):  # offloaded: a global ranking needs values, not layout
        return magnitude_scores(storage.read(paths[0]))
    raise ValueError(f"budget='global' cannot rank layer {name!r}: its weights are offloaded and it holds several "
                     "matrices; use budget='uniform' or 'erk', or load the model into memory")


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


@torch.no_grad()
def _blame_batch(model, later_calls, exc: Exception) -> None:
    """After a failure, a ValueError naming the first later batch the restored model cannot run."""
    for i, (args, kwargs) in enumerate(later_calls, start=1):
        try:
            model(*args, **kwargs)
        except Exception:
            raise ValueError(f"the model failed on calibration batch {i} ({type(exc).__name__}: {exc}); "
                             "check that every batch matches the model's inputs") from exc


def _checked(update: Update, w0: torch.Tensor, step: registry.OneShotStep) -> Update:
    """A step's answer, checked: a matrix like the layer's and, from a method, a boolean
    keep-mask (a refine keeps the method's)."""
    if not isinstance(update, Update) or update.weight.shape != w0.shape:
        raise TypeError(f"{step.role} {step.name!r} must return an Update with a weight of shape {tuple(w0.shape)}")
    mask = update.mask
    if step.role == "method" and (mask is None or mask.dtype != torch.bool or mask.shape != w0.shape):
        raise TypeError(f"method {step.name!r} must return a boolean keep-mask of shape {tuple(w0.shape)}")
    return update


def _check_args(method, refine, method_options, refine_options, pattern, sparsity, capture, exact=True,
                recalibrate_bn=False):
    """The method and refine instances (options validated), the pattern and the sparsity."""
    if refine in ("none", "null"):
        refine = None
    chooser = registry.get(method, "method")(method_options)
    refiner = registry.get(refine, "refine")(refine_options) if refine is not None else None
    if refine is None and refine_options:
        raise ValueError(f"refine_options were given without refine; pass refine= one of "
                         f"{', '.join(registry.names('refine'))} (or drop them)")
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False, got {exact!r}")
    if not isinstance(recalibrate_bn, bool):
        raise TypeError(f"recalibrate_bn must be True or False, got {recalibrate_bn!r}")
    if capture not in ("chain", "rerun"):
        raise ValueError(f"capture must be 'chain' or 'rerun', got {capture!r}")
    pattern = parse_pattern(pattern)
    for step in (chooser, refiner):
        if step is not None:
            step.check(pattern)
    if isinstance(pattern, NM):
        if sparsity is not None and abs(check_sparsity(sparsity) - pattern.sparsity) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts pattern {pattern} ({pattern.sparsity:g}); omit sparsity")
        return chooser, refiner, pattern, pattern.sparsity
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning, e.g. sparsity=0.5")
    return chooser, refiner, pattern, check_sparsity(sparsity)


def _check_include(model: nn.Module, include, targets, types) -> None:
    """An ``include`` regex that selects no target but names weighted modules no layer kind
    handles (or that ``types`` leaves out) is a ValueError naming them and the known kinds."""
    for pattern in [include] if isinstance(include, str) else list(include or ()):
        if any(re.search(pattern, n) for n in targets):
            continue
        hits = [(n, m) for n, m in model.named_modules()
                if re.search(pattern, n) and isinstance(getattr(m, "weight", None), torch.Tensor)]
        if not hits:
            continue
        name, module = hits[0]
        try:
            kind = kind_of(module).name
        except TypeError:
            raise ValueError(f"include={pattern!r} selects {name!r}, a {type(module).__name__}, which no layer kind "
                             f"handles; known kinds: {known_kinds()} (prunekit.layers.base.register_kind adds one)"
                             ) from None
        if types is not None and not isinstance(module, tuple(types)):
            raise ValueError(f"include={pattern!r} selects {name!r}, a {type(module).__name__} (layer kind {kind!r}), "
                             "which types= leaves out; add its type to types=")


def _sample_shape(call: tuple[tuple, dict]) -> tuple[int, ...] | None:
    """The shape of one sample of a calibration call's first input (None: not a batched tensor)."""
    first = first_input(call)
    return tuple(first.shape[1:]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None


def _first_batch(calls, calibration) -> Any:
    """One calibration batch, to find the head by a forward (None without data)."""
    if calls:
        args, kwargs = calls[0]  # as_call gives positional or keyword arguments, not both
        return kwargs if kwargs else args
    if calibration is None or isinstance(calibration, (torch.Tensor, Mapping)):
        return None
    return next(iter(calibration), None)


def _warn_skipped(skipped: Mapping[str, str]) -> None:
    """One warning for every layer left dense other than the head (which the summary lists)."""
    left = {n: why for n, why in skipped.items() if why != HEAD_REASON}
    if left:
        shown = "; ".join(f"{n!r}: {why}" for n, why in list(left.items())[:8])
        more = f"; and {len(left) - 8} more (see result.summary())" if len(left) > 8 else ""
        warnings.warn(f"prunekit left {len(left)} layer{'s' if len(left) > 1 else ''} dense: {shown}{more}")


def _check_weights(targets, storage: Storage) -> None:
    for name, module in targets.items():
        for path in storage.keys(name):
            weight = storage.live(path)
            if isinstance(weight, nn.parameter.UninitializedParameter) or (weight.is_meta and path not in storage.offloaded):
                raise ValueError(f"layer {name!r} has no weights yet (meta device or lazy module); materialise the "
                                 "model first, e.g. model.to_empty(device='cpu') then load its state_dict "
                                 "(an accelerate-dispatched model with offloaded weights is fine)")
            if not torch.isfinite(storage.read(path)).all():
                raise ValueError(f"layer {name!r} has NaN or Inf weights; fix the model before pruning")


def _skip_misfits(targets, pattern, strict: bool) -> dict[str, str]:
    skipped: dict[str, str] = {}
    for name, module in list(targets.items()):
        kind = kind_of(module)
        why = kind.why_not(module)
        if why is None and isinstance(pattern, NM):
            why = next((r for u in kind.units(module) if (r := kind.nm_why_not(module, u, pattern.m))), None)
        if why:
            if strict:
                raise ValueError(f"layer {name!r} cannot be pruned with pattern {pattern}: {why}; "
                                 f"exclude it (exclude={name!r}) or pass strict=False to skip it")
            skipped[name] = why
            del targets[name]
    return skipped
