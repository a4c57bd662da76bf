"""Running a :class:`~prunekit.oneshot.plan.Plan`: block by block, layer by layer.

For each block, in order, on inputs from the already-pruned blocks before it: gather the
statistics the steps asked for, choose each layer's support with the plan's
:class:`~.registry.Method`, then optionally refit the surviving weights with its
:class:`~.registry.Refine`, and write the layer. Only one block's inputs and one layer's
statistics are held at a time. On any error, including Ctrl-C, the model is restored exactly as
it was, from originals saved to disk as each layer is first changed
(:mod:`prunekit.oneshot.runtime.restore`).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calls import StopForward, first_input, to_device
from ..layers.base import LayerKind, kind_of, unit_name
from ..layers.routers import ROUTER_REASON, is_listed_expert
from ..layers.targets import HEAD_REASON
from . import registry
from .batchnorm import recalibrate_batchnorm
from .blocks import called_before, capture_inputs, execution_order, propagate, run_model, shared_input_groups
from .coverage import count_zeros
from .dead import dead_columns, keep_dead_dense
from .links import ChainCheck
from .plan import Plan, first_batch
from .registry import LayerContext, LayerProblem, Update
from .result import LayerReport, PruneResult
from .runtime.offload import is_dispatched, onloaded
from .runtime.placement import exact_float32, peak_memory_tracker, to_block_device
from .runtime.ranks import checksum
from .runtime.restore import RestorePoint
from .solvers.lstsq import reconstruction_error
from .stats import LayerStats, gather_stats

#: why a unit with no calibration rows (an expert no token reached) was pruned by magnitude
NO_ROWS = "no calibration token was routed to it, so it was pruned by magnitude"


def run(model: nn.Module, plan: Plan) -> PruneResult:
    """Prune ``model`` in place as ``plan`` says and report it; on any error the model is
    restored and the error raised (a later calibration batch that does not fit is named)."""
    c, steps = plan.config, plan.steps
    result = PruneResult(c.method, c.refine, str(steps.pattern), steps.sparsity, skipped=plan.skipped,
                         device=str(plan.device), stats_dtype=str(plan.dtype).replace("torch.", ""),
                         exact=c.exact, processes=plan.ranks.world if plan.needs_data else 1)
    job = Job(model, plan, result)
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    start = time.perf_counter()
    bar = tqdm(total=len(plan.units), desc=f"prune {c.method}" + (f"+{c.refine}" if c.refine else ""), unit="layer",
               disable=True if plan.ranks.rank else (not c.progress) if c.progress is not None else None, leave=False)
    job.bar = bar
    job.show_progress = not bar.disable
    tracker = peak_memory_tracker(plan.device)
    try:
        model.eval()
        # nn.TransformerEncoderLayer's fast path never calls its attention module: no hook would fire.
        torch.backends.mha.set_fastpath_enabled(False)
        # Only the parameters the layer kinds write ever change: each is saved to disk just before
        # its first change, and written back from there on any failure.
        with RestorePoint(plan.storage.write) as job.saved:
            if plan.needs_data:
                with exact_float32(plan.device):
                    job.run_calibrated(plan.calls, plan.blocks, c.capture)
            else:
                for key in plan.units:
                    name = plan.units[key][0]
                    with job.on_device([plan.targets[name]], [name]) if job.dispatched else contextlib.nullcontext():
                        job.prune_layer(key, None)
            # a cheap last check that every rank wrote the very same weights
            if plan.ranks.active:
                plan.ranks.same("the pruned weights",
                                {path: checksum(plan.storage.read(path)) for path in plan.storage.params},
                                error=RuntimeError, hint="the statistics were summed, so the ranks computed "
                                                         "differently (different libraries, thread counts or devices?)")
            if c.recalibrate_bn:  # only BatchNorm buffers change; restored by the helper itself on error
                result.bn_batches = recalibrate_batchnorm(model, [first_batch([call], None) for call in plan.calls])
    except BaseException as exc:
        if isinstance(exc, Exception) and not isinstance(exc, (ValueError, TypeError, torch.OutOfMemoryError)):
            _blame_batch(model, to_device(plan.calls[1:], plan.home), exc)  # only the first batch was checked up front
        raise
    finally:
        bar.close()
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    result.seconds = time.perf_counter() - start
    result.weights = count_zeros(model, plan.storage, plan.gaps)  # what result.sparsity reads
    _warn_skipped(result.skipped)
    _warn_fallbacks(result.fallbacks)
    result.peak_device_mib = tracker()
    return result


class Job:
    """The state of one prune() call while it runs: the plan, the progress bar, what is done."""

    def __init__(self, model: nn.Module, plan: Plan, result: PruneResult) -> None:
        self.model, self.result = model, result
        self.targets, self.budgets, self.pattern = plan.targets, plan.budgets, plan.steps.pattern
        self.units: dict[str, tuple[str, str]] = plan.units  # unit name -> (module name, unit)
        self.method, self.refine = plan.steps.method, plan.steps.refine
        needs = plan.steps.needs
        self.want_h = "hessian" in needs
        self.sequential = plan.config.sequential or bool(needs & {"dense_target", "sequential"})
        self.target_ids = {id(m) for m in plan.targets.values()}
        self.home, self.device, self.dtype, self.ranks = plan.home, plan.device, plan.dtype, plan.ranks
        self.exact, self.input_key, self.strict = plan.config.exact, plan.config.input_key, plan.config.strict
        self.storage, self.dispatched = plan.storage, is_dispatched(model)
        self.bar = None
        self.show_progress = False
        self.saved: RestorePoint | None = None
        self.model_input: tuple[int, ...] | None = None

    def on_device(self, modules, write_back=()):
        """``modules`` held on the execution device for the duration: moved there and back, or,
        for a model dispatched with accelerate, loaded from its offload storage and the pruned
        layers in ``write_back`` written back to it."""
        if self.dispatched:
            return onloaded(modules, self.device, self.storage, write_back)
        return to_block_device(modules, self.device, self.home)

    # -- block loop -------------------------------------------------------------------------
    def run_calibrated(self, calls, blocks, capture) -> None:
        """Prune the targets block by block, each fed by the blocks pruned before it: captured
        by re-running the model at every start of a chain (:mod:`.links`), else the previous
        block's outputs. Layers outside every block are pruned in whole-model passes: those the
        model runs before the first block first, the others last."""
        calls = to_device(calls, self.home)  # the model's own front (embeddings) runs where it is
        self.model_input = _sample_shape(calls[0])
        starts = _check_model_runs(self.model, calls[0], blocks, input_key=self.input_key).starts(capture)
        self.ranks.same("the blocks and where their chain starts", {"blocks": [n for n, _ in blocks], "starts": starts})
        owned = {n: self._owner(n, blocks) for n in self.targets}
        rest = {n: self.targets[n] for n in self.targets if owned[n] is None}
        # Layers outside every block that run before the first one (Whisper's convolutions) are
        # pruned first, so the blocks are calibrated on their pruned outputs; the rest last.
        if rest and blocks[0][1] is not self.model:
            front = called_before(self.model, blocks[0][1], rest, *calls[0])
            self.ranks.same("the layers run before the first block", {"front": front})
            if front:
                self.process_rest({n: rest.pop(n) for n in front}, calls)
        lookahead = self.refine is not None and "sequential" in self.refine.needs
        inputs = None
        for i, (bname, block) in enumerate(blocks):
            layers = {n: self.targets[n] for n in self.targets if owned[n] == i}
            if starts[i]:
                inputs = None  # freed before the next ones are captured
                inputs = to_device(capture_inputs(self.model, block, calls, progress=self.show_progress), self.device)
            # The blocks the chain feeds from here on: a lookahead refine (SNOWS) reads on into the
            # next one, which comes along to the device.
            chain = blocks[i:next((j for j in range(i + 1, len(blocks)) if starts[j]), len(blocks))]
            ahead = [m for _, m in chain[1:2]] if lookahead and layers else []
            with self.on_device([block, *ahead], list(layers)):
                if layers:
                    self.process_block(block, inputs, layers, chain=chain)
                if i + 1 < len(blocks) and not starts[i + 1]:
                    inputs = propagate(block, inputs)
        if rest:
            self.process_rest(rest, calls)

    def process_rest(self, layers, calls) -> None:
        """Prune layers outside every block: the whole model is their block."""
        with self.on_device([self.model], list(layers)):
            self.process_block(self.model, to_device(calls, self.device), layers, chain=[("", self.model)])

    @staticmethod
    def _owner(name: str, blocks) -> int | None:
        for i, (bname, _) in enumerate(blocks):
            if bname == "" or name == bname or name.startswith(bname + "."):
                return i
        return None

    def process_block(self, block, inputs, layers, chain) -> None:
        order, uncalled = execution_order(block, layers, *inputs[0])
        self.ranks.same("the layers a block calls", {"order": order, "uncalled": uncalled})
        # An expert of older code's per-expert layout runs only when tokens are routed to it: one
        # the first batch skips is calibrated on every batch all the same, and with no rows at all
        # it is pruned by magnitude and reported (prune_layer).
        late = [n for n in uncalled if is_listed_expert(self.model, n)]
        order, uncalled = order + late, [n for n in uncalled if n not in late]
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
        method, refine = self.method, self.refine
        if stats is not None and stats.count == 0:  # e.g. an expert no calibration token was routed to
            if self.strict:
                raise ValueError(f"strict=True: no calibration rows reached {key!r} (an expert no token is routed "
                                 f"to), so it has no statistics; calibrate on more or more varied data, exclude it "
                                 f"(exclude={name!r}), or pass strict=False to prune it by magnitude")
            method, refine, stats = registry.get("magnitude", "method")(), None, None
            self.result.fallbacks[key] = NO_ROWS
        if self.saved is not None:
            for path in self.storage.keys(name):
                self.saved.save(path, self.storage.live(path))
        # never a view of the layer; on the execution device (a magnitude-only run moves no block)
        w0 = kind.matrix(layer, unit).to(device=self.device, dtype=self.dtype, copy=True)
        report = LayerReport(key, kind.shape(layer, unit), 0.0)
        problem = LayerProblem(key, w0, self.budgets[key], self.pattern, stats, method,
                               self._context(layer, kind, unit, ctx) if ctx and stats is not None else None,
                               exact=self.exact)
        chosen = _checked(method.choose(problem), w0, method)
        w, mask, notes = chosen.weight, chosen.mask, [chosen.note or (NO_ROWS if key in self.result.fallbacks else "")]
        has_h = stats is not None and stats.h_sum is not None
        if has_h:
            report.error_selected = self._error(w, w0, stats)
        if refine is not None:
            refitted = _checked(refine.refine(problem, chosen), w0, refine)
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
        if refine is not None and has_h:
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


def _stages(layers: dict[str, nn.Module], group: list[str]) -> list[dict[str, tuple[str, ...]]]:
    """The statistics passes of a group of layers reading one input: every module's first-stage
    units together, then each later stage ({module name: units})."""
    stages = {n: kind_of(layers[n]).stages(layers[n]) for n in group}
    out = [{n: st[0] for n, st in stages.items()}]
    for i in range(1, max(len(st) for st in stages.values())):
        out.append({n: st[i] for n, st in stages.items() if i < len(st)})
    return out


@torch.no_grad()
def _check_model_runs(model, call, blocks, input_key=None) -> ChainCheck:
    """One forward on the first batch, up to the last calibrated block, so data that does not
    fit fails early and clearly (without computing an LM head's logits), which also checks the
    blocks and finds where their chain holds (:class:`.links.ChainCheck`). A tuple batch the
    model takes too many positional arguments of is most likely ``(inputs, labels)``: the
    error then names ``input_key``."""
    args, kwargs = call
    with ChainCheck(blocks) as check:
        try:
            run_model(model, args, kwargs)
        except StopForward:
            pass
        except Exception as exc:
            fix = "check that the batches match the model's inputs"
            if isinstance(exc, TypeError) and "positional argument" in str(exc) and len(args) > 1 and input_key is None:
                fix = (f"each batch is a tuple of {len(args)}, called as model(*batch); if the loader yields (inputs, "
                       "labels) pairs, pass input_key=0 to give the model the inputs alone (prune.input_key in a "
                       "recipe, --input-key 0 on the command line; or a function batch -> inputs)")
            elif _lacks_decoder_inputs(model, kwargs):
                fix = ("an encoder-decoder model runs its decoder too: give every batch decoder inputs as well, "
                       "e.g. decoder_input_ids (or labels)")
            raise ValueError(f"the model failed on the first calibration batch ({type(exc).__name__}: {exc}); "
                             f"{fix}") from exc
    return check


def _lacks_decoder_inputs(model, kwargs: dict) -> bool:
    """Whether ``model`` is a transformers encoder-decoder called without any decoder input."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return not any(k in kwargs for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels"))


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


def _sample_shape(call: tuple[tuple, dict]) -> tuple[int, ...] | None:
    """The shape of one sample of a calibration call's first input (None: not a batched tensor)."""
    first = first_input(call)
    return tuple(first.shape[1:]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None


def _warn_fallbacks(fallbacks: Mapping[str, str]) -> None:
    """One warning naming the matrices pruned by magnitude for want of calibration rows."""
    if fallbacks:
        more = f" and {len(fallbacks) - 8} more" if len(fallbacks) > 8 else ""
        names = ", ".join(map(repr, list(fallbacks)[:8])) + more
        warnings.warn(f"prunekit pruned {len(fallbacks)} matrices by magnitude: no calibration token was routed to "
                      f"them ({names}; see result.fallbacks; strict=True refuses instead)")


def _warn_skipped(skipped: Mapping[str, str]) -> None:
    """One warning for every layer left dense other than the head and the routers (which the
    summary lists)."""
    left = {n: why for n, why in skipped.items() if why not in (HEAD_REASON, ROUTER_REASON)}
    if left:
        shown = "; ".join(f"{n!r}: {why}" for n, why in list(left.items())[:8])
        more = f"; and {len(left) - 8} more (see result.summary())" if len(left) > 8 else ""
        warnings.warn(f"prunekit left {len(left)} layer{'s' if len(left) > 1 else ''} dense: {shown}{more}")
