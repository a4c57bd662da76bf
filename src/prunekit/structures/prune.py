"""``prunekit.prune_structured``: remove MLP neurons and attention heads in one shot and repair.

Block by block, in order, on inputs from the already-pruned blocks before it (as ``prune()``
does for masks): for each structure in the block, in execution order,

1. gather its consumer's input statistics from the pruned block and, for the dense target, from
   a dense copy of the block fed the dense model's inputs;
2. choose the units to remove (``method``): by a score (magnitude, Wanda's activation-aware
   score, FLAP's fluctuation) or greedily by OBS;
3. repair the consumer's kept columns (``refine``): exact least squares to the dense block's
   output (``"lstsq"``), FLAP's bias compensation (``"bias"``) or nothing (None);
4. make the modules physically smaller and update the model's config.

Any failure, Ctrl-C included, puts the model back exactly as it was (an undo log of the
replaced parameters and attributes).
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..oneshot.blocks import capture_inputs, execution_order, find_blocks, propagate
from ..oneshot.calibration import collect_batches
from ..oneshot.solvers.columns import SCORES, group_scores, obs_remove, output_error, refit_columns
from .budget import counts_for
from .find import find_structures
from .mha import swap_in
from .stats import ConsumerStats, InputRecorder
from .surgery import Undo, matrix, shrink
from .units import Structure, StructureReport

METHODS = SCORES
REFINES = (None, "bias", "lstsq")
BIASES = ("auto", True, False)
TARGETS = ("pruned", "dense")
OBS_DAMP = 0.01  # SparseGPT's damping of H before inverting it


@dataclass
class StructuredResult:
    """What ``prune_structured`` did: one report per structure, the parameters of the model
    before and after (counted from its tensors), and the wall time."""

    reports: list[StructureReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self) -> str:
        lines = [f"{'structure':48s} {'units':>11s} {'error dropped':>14s} {'error refit':>12s}"]
        for r in self.reports:
            fmt = lambda e: "-" if e is None else f"{e:.4g}"  # noqa: E731
            lines.append(f"{r.owner + ' (' + r.kind + ')':48s} {f'{r.units_before}->{r.units_after}':>11s} "
                         f"{fmt(r.error_dropped):>14s} {fmt(r.error_refit):>12s}")
        lines.append(f"parameters {self.params_before:,} -> {self.params_after:,} "
                     f"({100 * self.removed_fraction:.1f}% fewer) in {self.seconds:.1f} s")
        return "\n".join(lines)


def _check(structures, method, refine, bias, target, ratio, params) -> tuple[str, ...]:
    if isinstance(structures, str):
        structures = tuple(s.strip() for s in structures.split(",") if s.strip())
    structures = tuple(structures)
    if not structures or any(s not in ("mlp", "heads") for s in structures):
        raise ValueError(f"structures must be drawn from 'mlp', 'heads' (e.g. 'mlp,heads'), got {structures!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} for structures, got {method!r}")
    if refine not in REFINES:
        raise ValueError(f"refine must be one of None, 'bias', 'lstsq' for structures, got {refine!r}")
    if bias not in BIASES:
        raise ValueError(f"bias must be 'auto', True or False, got {bias!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if (ratio is None) == (params is None):
        raise ValueError("give exactly one of ratio= (fraction of each structure's units) or params= "
                         "(fraction of the model's parameters to remove)")
    for name, value in (("ratio", ratio), ("params", params)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 < value < 1):
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return structures


def _block_of(owner: str, blocks: list[tuple[str, nn.Module]]) -> int | None:
    for i, (name, _) in enumerate(blocks):
        if name == "" or owner == name or owner.startswith(name + "."):
            return i
    return None


def prune_structured(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    *,
    structures: str | Sequence[str] = ("mlp",),
    ratio: float | None = None,
    params: float | None = None,
    method: str = "wanda",
    refine: str | None = "lstsq",
    bias: str | bool = "auto",
    target: str = "pruned",
    blocks: Sequence[str] | None = None,
    max_batches: int | None = None,
    damp: float = 0.1,
    multiple_of: int = 1,
    progress: bool | None = None,
) -> StructuredResult:
    """Remove whole MLP neurons and/or attention heads from ``model`` in place and repair it.

    ``ratio`` removes that fraction of every structure's units (the same count in every layer,
    so a Hugging Face config stays standard); ``params`` instead sets the fraction of the
    model's parameters to remove and finds the uniform ratio that gets closest. ``method`` chooses
    the units (``wanda``: ``||W[:, j]||^2 E[x_j^2]``; ``magnitude``; ``flap``: ``||W[:, j]||^2 Var[x_j]``;
    ``obs``: greedy second-order removal). ``refine="lstsq"`` refits each consumer's kept
    columns to the dense layer's output on the same inputs (``target="pruned"``, the default;
    ``"dense"`` fits the dense model's output on the dense model's inputs instead, which
    measured worse on SmolLM2), with a ridge ``damp`` that pulls the kept columns towards their
    dense values; ``multiple_of`` rounds every MLP's kept width to a multiple of it (CPU matrix
    kernels can be slower on odd widths); ``bias=True`` also fits a bias (adding one, and setting ``mlp_bias`` /
    ``attention_bias`` in the config, where the consumer had none), ``"auto"`` only where it has one.
    """
    if refine == "none":
        refine = None
    structures = _check(structures, method, refine, bias, target, ratio, params)
    found = find_structures(model, structures)
    if not found:
        raise ValueError(f"the model has no recognised {'/'.join(structures)} structure (prunekit recognises "
                         "SwiGLU, BERT, GPT-2, fc1/fc2, nn.TransformerEncoderLayer and nn.Sequential(Linear, act, "
                         "Linear) MLPs, and q/k/v/o_proj attention with a head_dim, BERT, GPT-2 and "
                         "nn.MultiheadAttention heads)")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an integer >= 1, got {multiple_of!r}")
    counts = counts_for(model, found, ratio, params, multiple_of)
    for s in found:
        why = s.removable(counts[s.owner])
        if why:
            raise ValueError(f"{s.owner}: {why}; lower {'ratio' if ratio is not None else 'params'}")
    needs_data = not (method == "magnitude" and refine is None)
    calls = collect_batches(calibration, max_batches) if needs_data else []
    block_list = find_blocks(model, blocks)
    where = {s.owner: _block_of(s.owner, block_list) for s in found}
    outside = [o for o, b in where.items() if b is None]
    if outside:
        raise ValueError(f"structures {outside[:3]} lie outside the calibrated blocks; pass blocks= that contain them")
    result = StructuredResult(params_before=sum(p.numel() for p in model.parameters()))
    undo = Undo()
    start = time.perf_counter()
    was_training = model.training
    bar = tqdm(total=len(found), desc="prune structures", unit="structure", leave=False,
               disable=(not progress) if progress is not None else None)
    try:
        model.eval()
        if swap_in(model, found, undo):  # nn.MultiheadAttention -> a drop-in that can hold fewer heads
            block_list = find_blocks(model, blocks)
        with torch.no_grad():
            if needs_data:
                _run_blocks(model, block_list, found, where, counts, calls, method, refine, bias, target, damp,
                            undo, result, bar)
            else:
                for s in found:
                    result.reports.append(_prune_one(model, s, counts[s.owner], None, method, refine, bias, damp, undo))
                    bar.update()
            result.config = _update_config(model, found, undo)
    except BaseException:
        undo.restore()
        raise
    finally:
        bar.close()
        model.train(was_training)
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    return result


def _run_blocks(model, block_list, found, where, counts, calls, method, refine, bias, target, damp, undo, result, bar):
    first = min(where.values())
    inputs = capture_inputs(model, block_list[first][1], calls)
    dense_inputs = list(inputs) if target == "dense" else None
    last = max(where.values())
    for b in range(first, last + 1):
        block = block_list[b][1]
        mine = [s for s in found if where[s.owner] == b]
        dense_block = copy.deepcopy(block) if dense_inputs is not None and mine else None
        if mine:
            modules = dict(model.named_modules())
            args, kwargs = inputs[0]
            order, _ = execution_order(block, {s.owner: modules[s.consumer] for s in mine}, args, kwargs)
            mine.sort(key=lambda s: order.index(s.owner) if s.owner in order else len(order))
        for s in mine:
            stats = _gather(model, block, dense_block, s, inputs, dense_inputs, block_list[b][0])
            result.reports.append(_prune_one(model, s, counts[s.owner], stats, method, refine, bias, damp, undo))
            bar.update()
        if b < last:
            propagate(block, inputs)
            if dense_inputs is not None:
                propagate(dense_block if dense_block is not None else block, dense_inputs)
        del dense_block


def _gather(model, block, dense_block, s: Structure, inputs, dense_inputs, block_name: str) -> ConsumerStats:
    consumer = dict(model.named_modules())[s.consumer]
    stats = ConsumerStats(matrix(consumer).shape[1], dense=dense_block is not None, device=consumer.weight.device)
    rec = InputRecorder(consumer)
    rec_t = None
    if dense_block is not None:
        local = s.consumer[len(block_name) + 1:] if block_name else s.consumer
        rec_t = InputRecorder(dense_block.get_submodule(local))
    try:
        for i, (args, kwargs) in enumerate(inputs):
            block(*args, **kwargs)
            xs = rec.take()
            xt = None
            if rec_t is not None:
                t_args, t_kwargs = dense_inputs[i]
                dense_block(*t_args, **t_kwargs)
                xt = rec_t.take()
            stats.add(xs, xt)
    finally:
        rec.close()
        if rec_t is not None:
            rec_t.close()
    return stats


def _choose(s: Structure, count: int, w: torch.Tensor, stats: ConsumerStats | None, score: str,
            damp: float) -> tuple[list[int], torch.Tensor | None]:
    """Units to remove (sorted) and, for OBS, the updated matrix."""
    groups = s.column_groups()
    per_group = s.kind == "heads" and s.q_per_kv > 1
    if score == "obs":
        buckets = (torch.arange(s.units) // s.q_per_kv) if per_group else None
        removed, w_obs = obs_remove(w, stats.hessian, groups, count, damp=OBS_DAMP, buckets=buckets)
        return sorted(removed), w_obs
    kw = {} if stats is None else {"sq_mean": stats.sq_mean, "variance": stats.variance}
    values = group_scores(score, w, groups, **kw)
    if not per_group:
        return sorted(_lowest(values, torch.arange(s.units), count)), None
    removed = []
    for g in range(s.kv_heads):
        heads = torch.arange(g * s.q_per_kv, (g + 1) * s.q_per_kv)
        removed += _lowest(values[heads], heads, count // s.kv_heads)
    return sorted(removed), None


def _lowest(values: torch.Tensor, ids: torch.Tensor, count: int) -> list[int]:
    """The ``count`` ids of lowest value; ties towards the lower id (deterministic)."""
    order = sorted(range(len(ids)), key=lambda i: (float(values[i]), int(ids[i])))
    return [int(ids[i]) for i in order[:count]]


def _prune_one(model, s: Structure, count: int, stats: ConsumerStats | None, method, refine, bias, damp,
               undo: Undo) -> StructureReport:
    t0 = time.perf_counter()
    consumer = dict(model.named_modules())[s.consumer]
    w = matrix(consumer).double()
    b = None if consumer.bias is None else consumer.bias.detach().double()
    removed, w_obs = _choose(s, count, w, stats, method, damp) if count else ([], None)
    keep = [u for u in range(s.units) if u not in set(removed)]
    cols = s.column_groups()[keep].reshape(-1)
    fit_bias = refine == "lstsq" and (bias is True or (bias == "auto" and b is not None))
    new_b = b
    if refine == "lstsq" and stats is not None:
        new_w, fitted = refit_columns(w, cols, stats.hessian, cross=stats.cross, bias=b, mean_s=stats.mean_s,
                                      mean_t=stats.mean_t, fit_bias=fit_bias, damp=damp)
        new_b = fitted if fit_bias else b
    elif refine == "bias" and stats is not None and (b is not None or bias is True):
        dropped = s.column_groups()[removed].reshape(-1)
        new_w = w[:, cols]
        new_b = (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)) + w[:, dropped] @ stats.mean_s[dropped]
    else:
        new_w = (w_obs if w_obs is not None else w)[:, cols]
    report = StructureReport(s.kind, s.owner, s.units, len(keep), removed=removed)
    if stats is not None:
        kw = dict(cross=stats.cross, target_gram=stats.target_gram, mean_s=stats.mean_s, mean_t=stats.mean_t, bias=b)
        report.error_dropped = output_error(w, cols, w[:, cols], stats.hessian, **kw, new_bias=b)
        report.error_refit = output_error(w, cols, new_w, stats.hessian, **kw, new_bias=new_b)
    if not torch.isfinite(new_w).all():
        raise ValueError(f"{s.owner}: the refit produced non-finite weights; raise damp= or use refine=None")
    shrink(model, s, keep, new_w.to(consumer.weight.dtype), None if new_b is b else new_b, undo)
    report.seconds = time.perf_counter() - t0
    return report


def _update_config(model: nn.Module, found: list[Structure], undo: Undo) -> dict[str, Any]:
    """Write the new widths into the model's config when every structure of a kind has the same
    width (a standard config); otherwise leave it and warn (the per-layer sizes are in the weights)."""
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    changed: dict[str, Any] = {}
    mlps = [s for s in found if s.kind == "mlp"]
    widths = {matrix(modules[s.consumer]).shape[1] for s in mlps}
    if mlps and config is not None:
        key = mlps[0].config_key
        if len(widths) == 1 and key and hasattr(config, key):
            changed[key] = widths.pop()
        elif len(widths) > 1:
            warnings.warn("MLP widths differ between layers: the config keeps its intermediate size; "
                          "reload with prunekit.load_structured")
        if any(modules[s.consumer].bias is not None for s in mlps) and getattr(config, "mlp_bias", None) is False:
            changed["mlp_bias"] = True
    heads = [s for s in found if s.kind == "heads" and s.config_key]
    if config is not None and any(s.kind == "heads" and not s.config_key for s in found):
        warnings.warn("the config cannot express fewer attention heads here (head size = hidden / heads): it is "
                      "left as it was; reload the pruned weights with prunekit.load_structured")
    if heads and config is not None:
        q = {modules[s.consumer].in_features // s.unit_size for s in heads}
        kv = {modules[s.kv_producers[0]].out_features // s.unit_size for s in heads}
        if len(q) == 1 and len(kv) == 1:
            changed.update(num_attention_heads=q.pop(), num_key_value_heads=kv.pop(), head_dim=heads[0].unit_size)
        if any(modules[s.consumer].bias is not None for s in heads) and getattr(config, "attention_bias", None) is False:
            changed["attention_bias"] = True
    for key, value in changed.items():
        undo.set(config, key, value)
    return changed
