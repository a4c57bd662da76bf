"""``prunekit.prune``: one-shot pruning of a trained model, block by block.

1. pick the prunable layers and a per-layer budget;
2. for each block, in order, on inputs from the already-pruned blocks before it:
   choose each layer's support (magnitude, Wanda, SparseGPT), then optionally refit the
   surviving weights on that support (exact least squares, or SNOWS);
3. report per-layer sparsity (read from the tensors), reconstruction errors and time.

Only one block's inputs and one layer's statistics are held at a time. On any error,
including Ctrl-C, the model is restored exactly as it was.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import allocate, check_sparsity
from ..layout import from_matrix, to_matrix
from ..patterns import NM, Unstructured, parse_pattern
from ..targets import DEFAULT_TYPES, find_targets
from .blocks import capture_inputs, execution_order, find_blocks, forward_until, propagate, shared_input_groups
from .calibration import collect_batches
from .lstsq import lstsq_refit, reconstruction_error
from .result import LayerReport, PruneResult
from .selection import magnitude_scores, select_mask, wanda_scores
from .snows import SnowsConfig, snows_refit
from .sparsegpt import sparsegpt
from .stats import LayerStats, gather_stats

METHODS = ("magnitude", "wanda", "sparsegpt")
REFINES = (None, "lstsq", "snows")


def prune(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    pattern: str | NM | Unstructured = "unstructured",
    method: str = "magnitude",
    refine: str | None = None,
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
    snows: SnowsConfig | Mapping[str, Any] | None = None,
    sparsegpt_block_size: int | None = None,
    damp: float = 0.01,
    lstsq_damp: float = 1e-4,
    progress: bool | None = None,
) -> PruneResult:
    """Prune ``model`` in place, one shot, and return a :class:`PruneResult`.

    ``calibration`` is any iterable of input batches (tensor -> ``model(x)``, tuple ->
    ``model(*b)``, mapping -> ``model(**b)``); it is needed by every method but plain
    magnitude. ``sparsity`` is the fraction of prunable weights to remove (implied by an N:M
    ``pattern``). ``budget`` is ``uniform``, ``global`` (optionally with a per-layer ``cap``)
    or ``erk``; ``overrides`` maps layer-name regexes to fixed sparsities. ``blocks`` names
    the modules calibrated in order (auto-detected by default); ``capture="rerun"`` re-runs
    the model to capture each block's inputs instead of chaining outputs, for models whose
    blocks do not feed each other directly. ``sequential=True`` recomputes statistics after
    every layer inside a block (always on with ``refine``). ``sparsegpt_block_size`` is the
    width of SparseGPT's column blocks: 128 by default, rounded down to a multiple of M for N:M.
    """
    method, refine, pattern, sparsity = _check_args(method, refine, pattern, sparsity, capture)
    if isinstance(pattern, NM) and (budget != "uniform" or cap is not None or overrides):
        raise ValueError(f"pattern {pattern} fixes every layer's sparsity at {pattern.sparsity:g}; use budget='uniform' "
                         f"without cap or overrides (got budget={budget!r}, cap={cap!r}, overrides={overrides!r}), "
                         "and exclude= for layers to keep dense")
    block_size = _sparsegpt_block_size(sparsegpt_block_size, pattern)
    targets = find_targets(model, types=types, include=include, exclude=exclude, include_head=include_head)
    if not targets:
        raise ValueError("the model has no prunable layer; check `types`, `include` and `exclude`")
    _check_weights(targets)
    skipped = _skip_misfits(targets, pattern, strict)
    if not targets:
        raise ValueError(f"no layer fits pattern {pattern}: {skipped}")
    snows_cfg = _snows_config(snows) if refine == "snows" else None
    needs_data = method != "magnitude" or refine is not None
    calls = collect_batches(calibration, max_batches) if needs_data else []
    if isinstance(pattern, NM):
        budgets = {n: pattern.sparsity for n in targets}
    else:
        # Only a global budget ranks weights; uniform and ERK need shapes alone (no copy).
        scores = {n: magnitude_scores(m.weight) if budget == "global" else m.weight.detach()
                  for n, m in targets.items()}
        budgets = allocate(scores, sparsity, budget, cap=cap, overrides=overrides)
        del scores

    result = PruneResult(method, refine, str(pattern), pattern.sparsity if isinstance(pattern, NM) else sparsity, skipped=skipped)
    job = _Job(model, targets, budgets, pattern, method, refine, snows_cfg, sequential,
               block_size, damp, lstsq_damp, result)
    # Only the target weights ever change: they are all the restore point needs.
    snapshot = {n: m.weight.detach().clone() for n, m in targets.items()}
    was_training = model.training
    start = time.perf_counter()
    bar = tqdm(total=len(targets), desc=f"prune {method}" + (f"+{refine}" if refine else ""), unit="layer",
               disable=(not progress) if progress is not None else None, leave=False)
    job.bar = bar
    job.show_progress = not bar.disable
    try:
        model.eval()
        if needs_data:
            job.run_calibrated(calls, blocks, capture)
        else:
            for name in targets:
                job.prune_layer(name, None)
    except BaseException as exc:
        with torch.no_grad():
            for name, weight in snapshot.items():
                targets[name].weight.copy_(weight)
        if isinstance(exc, Exception) and not isinstance(exc, (ValueError, TypeError, torch.OutOfMemoryError)):
            _blame_batch(model, calls[1:], exc)  # only the first batch was checked up front
        raise
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


class _Job:
    """The state of one prune() call: which layers, what budgets, what is done."""

    def __init__(self, model, targets, budgets, pattern, method, refine, snows_cfg, sequential,
                 block_size, damp, lstsq_damp, result) -> None:
        self.model, self.targets, self.budgets, self.pattern = model, targets, budgets, pattern
        self.method, self.refine, self.snows_cfg = method, refine, snows_cfg
        self.sequential = sequential or refine is not None
        self.block_size, self.damp, self.lstsq_damp = block_size, damp, lstsq_damp
        self.result = result
        self.target_ids = {id(m) for m in targets.values()}
        self.bar = None
        self.show_progress = False

    # -- block loop -------------------------------------------------------------------------
    def run_calibrated(self, calls, block_names, capture) -> None:
        blocks = find_blocks(self.model, block_names)
        _check_model_runs(self.model, calls[0], last_block=blocks[-1][1])
        owned = {n: self._owner(n, blocks) for n in self.targets}
        inputs = None
        for i, (bname, block) in enumerate(blocks):
            layers = {n: self.targets[n] for n in self.targets if owned[n] == i}
            if inputs is None or capture == "rerun":
                inputs = capture_inputs(self.model, block, calls, progress=self.show_progress)
            if layers:
                self.process_block(block, inputs, layers, chain=blocks[i:])
            if i + 1 < len(blocks) and capture == "chain":
                inputs = propagate(block, inputs)
        rest = {n: self.targets[n] for n in self.targets if owned[n] is None}
        if rest:  # layers outside every block: the whole model is their block
            self.process_block(self.model, list(calls), rest, chain=[("", self.model)])

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
            stats = gather_stats(block, inputs, {n: layers[n] for n in order}, want_h=self.method == "sparsegpt")
            for name in order:
                self.prune_layer(name, stats[name])
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
                                 all_layers=layers, stop_early=once)
            for name in group:
                self.prune_layer(name, stats.pop(name), inputs=inputs, chain=chain, block_layers=layers, dense=dense)

    # -- one layer --------------------------------------------------------------------------
    def prune_layer(self, name: str, stats: LayerStats | None, **ctx) -> None:
        t0 = time.perf_counter()
        layer = self.targets[name]
        w0 = to_matrix(layer.weight.detach()).to(torch.float64, copy=True)  # never a view of the layer
        s = self.budgets[name]
        report = LayerReport(name, tuple(layer.weight.shape), 0.0)
        if self.method == "sparsegpt":
            out = sparsegpt(w0, stats.hessian, s, self.pattern, block_size=self.block_size, damp=self.damp)
            w, mask = out.weight, out.mask
            if out.damp_used != self.damp:
                report.note = f"dampening raised to {out.damp_used:g}"
        else:
            scores = magnitude_scores(w0) if self.method == "magnitude" else wanda_scores(w0, stats.sq)
            mask = select_mask(scores, s, self.pattern, per_row=self.method == "wanda")
            w = w0 * mask
        if stats is not None and stats.h_sum is not None:
            report.error_selected = self._error(w, w0, stats)
        if self.refine == "lstsq":
            w = lstsq_refit(w0, mask, stats.hessian, stats.cross, damp=self.lstsq_damp)
        elif self.refine == "snows":
            warm = self.snows_cfg.warm_start
            if warm == "lstsq" or (warm == "auto" and self.method != "sparsegpt"):
                w = lstsq_refit(w0, mask, stats.hessian, stats.cross, damp=self.lstsq_damp)
            self._write(layer, w, mask)
            solve, before, after = snows_refit(
                self.model, ctx["chain"], layer, from_matrix(mask, layer.weight.shape), ctx["inputs"],
                config=self.snows_cfg, targets=self.target_ids, block_layers=ctx["block_layers"],
                dense_weights=ctx["dense"], progress=self.show_progress,
            )
            report.lookahead_before, report.lookahead_after = before, after
            notes = [f"{solve.failed_line_searches} line searches failed"] if solve.failed_line_searches else []
            if solve.negative_curvature:  # CG stopped at a direction of non-positive curvature
                notes.append(f"negative curvature in {solve.negative_curvature} of {solve.steps} CG solves")
            report.note = "; ".join(notes)
            w = to_matrix(layer.weight.detach()).to(torch.float64, copy=True)
        self._write(layer, w, mask)
        if self.refine is not None:
            report.error_refined = self._error(w * mask, w0, stats)
        report.sparsity = float((layer.weight == 0).sum()) / layer.weight.numel()
        report.seconds = time.perf_counter() - t0
        # The promise, checked as each layer is written (later layers never touch this one), so
        # no mask is kept and memory does not grow with the number of layers.
        if layer.weight.detach()[~from_matrix(mask, layer.weight.shape)].any():
            raise RuntimeError(f"internal error: layer {name} has non-zero pruned entries")
        self.result.layers.append(report)
        if self.bar is not None:
            self.bar.update()

    @staticmethod
    @torch.no_grad()
    def _write(layer: nn.Module, w: torch.Tensor, mask: torch.Tensor) -> None:
        # torch.where writes +0.0 (w * mask would leave -0.0 behind negative pruned weights)
        kept = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
        layer.weight.copy_(from_matrix(kept.to(layer.weight.dtype), layer.weight.shape))

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


@torch.no_grad()
def _blame_batch(model, later_calls, exc: Exception) -> None:
    """After a failure, a ValueError naming the first later batch the restored model cannot run."""
    for i, (args, kwargs) in enumerate(later_calls, start=1):
        try:
            model(*args, **kwargs)
        except Exception:
            raise ValueError(f"the model failed on calibration batch {i} ({type(exc).__name__}: {exc}); "
                             "check that every batch matches the model's inputs") from exc


def _check_args(method, refine, pattern, sparsity, capture):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if refine not in REFINES:
        raise ValueError(f"refine must be one of {REFINES}, got {refine!r}")
    if capture not in ("chain", "rerun"):
        raise ValueError(f"capture must be 'chain' or 'rerun', got {capture!r}")
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        if sparsity is not None and abs(check_sparsity(sparsity) - pattern.sparsity) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts pattern {pattern} ({pattern.sparsity:g}); omit sparsity")
        return method, refine, pattern, pattern.sparsity
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning, e.g. sparsity=0.5")
    return method, refine, pattern, check_sparsity(sparsity)


def _sparsegpt_block_size(block_size, pattern) -> int:
    """SparseGPT chooses N:M masks inside column blocks, so a block must hold whole groups of M."""
    m = pattern.m if isinstance(pattern, NM) else 1
    if block_size is None:
        return max(m, 128 - 128 % m)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"sparsegpt_block_size must be a positive integer, got {block_size!r}")
    if block_size % m:
        raise ValueError(f"sparsegpt_block_size={block_size} is not a multiple of M={m} for pattern {pattern}; "
                         f"use {max(m, block_size - block_size % m)} or leave it unset")
    return block_size


def _check_weights(targets) -> None:
    for name, module in targets.items():
        if isinstance(module.weight, nn.parameter.UninitializedParameter) or module.weight.is_meta:
            raise ValueError(f"layer {name!r} has no weights yet (meta device or lazy module); materialise the "
                             "model first, e.g. model.to_empty(device='cpu') then load its state_dict")
        if not torch.isfinite(module.weight).all():
            raise ValueError(f"layer {name!r} has NaN or Inf weights; fix the model before pruning")


def _skip_misfits(targets, pattern, strict: bool) -> dict[str, str]:
    skipped: dict[str, str] = {}
    for name, module in list(targets.items()):
        why = None
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            why = "grouped/depthwise convolution (not supported yet)"
        elif isinstance(pattern, NM) and to_matrix(module.weight).shape[1] % pattern.m:
            why = f"input dimension {to_matrix(module.weight).shape[1]} is not a multiple of {pattern.m}"
        if why:
            if strict:
                raise ValueError(f"layer {name!r} cannot be pruned with pattern {pattern}: {why}; "
                                 f"exclude it (exclude={name!r}) or pass strict=False to skip it")
            warnings.warn(f"skipping layer {name!r}: {why}")
            skipped[name] = why
            del targets[name]
    return skipped


def _snows_config(snows) -> SnowsConfig:
    """A validated SnowsConfig from None, a SnowsConfig, or a dict of SNOWS and solver options."""
    from .newton_cg import NewtonCGConfig

    if snows is None:
        snows = {}
    if isinstance(snows, SnowsConfig):
        config = snows
    elif isinstance(snows, Mapping):
        opts = dict(snows)
        solver_keys = set(NewtonCGConfig.__dataclass_fields__)
        solver = {k: opts.pop(k) for k in list(opts) if k in solver_keys}
        unknown = set(opts) - set(SnowsConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown snows options {sorted(unknown)}; known: k, warm_start and {sorted(solver_keys)}")
        config = SnowsConfig(**opts, solver=NewtonCGConfig(**{**SnowsConfig().solver.__dict__, **solver}))
    else:
        raise TypeError(f"snows must be a SnowsConfig or a dict of options, got {type(snows).__name__}")
    if config.warm_start not in ("auto", "lstsq", "none"):
        raise ValueError(f"snows warm_start must be 'auto', 'lstsq' or 'none', got {config.warm_start!r}")
    if isinstance(config.k, bool) or not isinstance(config.k, int) or config.k < 0:
        raise ValueError(f"snows k must be a non-negative integer (operations to look ahead), got {config.k!r}")
    _check_solver(config.solver)
    return config


def _check_solver(solver) -> None:
    """Refuse solver options under which SNOWS would silently do nothing or diverge."""
    def count(v, low):
        return not isinstance(v, bool) and isinstance(v, int) and v >= low

    def real(v, ok):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and ok(v)

    checks = {"epochs": (count(solver.epochs, 1), ">= 1"), "max_cg": (count(solver.max_cg, 1), ">= 1"),
              "max_backtracks": (count(solver.max_backtracks, 1), ">= 1"), "patience": (count(solver.patience, 0), ">= 0"),
              "max_steps": (solver.max_steps is None or count(solver.max_steps, 1), "None or >= 1"),
              "cg_tol": (real(solver.cg_tol, lambda v: v > 0), "> 0"), "damping": (real(solver.damping, lambda v: v >= 0), ">= 0"),
              "armijo_c": (real(solver.armijo_c, lambda v: 0 < v < 1), "in (0, 1)"),
              "shrink": (real(solver.shrink, lambda v: 0 < v < 1), "in (0, 1)"),
              "stagnation": (real(solver.stagnation, lambda v: 0 < v <= 1), "in (0, 1]")}
    for name, (ok, rule) in checks.items():
        if not ok:
            raise ValueError(f"snows option {name} must be {rule}, got {getattr(solver, name)!r}")
