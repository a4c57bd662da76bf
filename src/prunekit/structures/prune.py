"""``prunekit.prune_structured``: remove MLP neurons and attention heads in one shot and repair.

Block by block, in order, on inputs from the already-pruned blocks before it (as ``prune()``
does for masks): for each structure in the block, in execution order,

1. gather its consumer's input statistics from the pruned block and, for the dense target, from
   a dense copy of the block fed the dense model's inputs;
2. choose the units to remove (``method``): by a score (magnitude, Wanda's activation-aware
   score, FLAP's fluctuation) or greedily by OBS;
3. repair the consumer's kept columns (``refine``): exact least squares to the dense block's
   output (``"lstsq"``), that and then SNOWS's K-step lookahead (``"snows"``, see
   :mod:`.snows`), FLAP's bias compensation (``"bias"``) or nothing (None);
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

from ..calls import model_device, to_device
from ..oneshot.blocks import capture_inputs, execution_order, find_blocks, propagate
from ..oneshot.calibration import collect_batches
from ..oneshot.registry import make_options
from ..oneshot.runtime.placement import execution_device, to_block_device
from ..oneshot.runtime.ranks import Ranks, across_ranks, shard
from ..oneshot.snows_options import SnowsOptions
from ..oneshot.solvers.columns import group_scores, obs_remove, output_error, refit_columns
from .budget import counts_for
from .config import StructuredConfig
from .find import find_structures
from .shapes import CONFIG_KEY, merge_shapes, structure_shapes
from .mha import swap_in
from .ranks import agree
from .snows import prunable_ids, snows_structure
from .stats import ConsumerStats, InputRecorder
from .surgery import Undo, matrix, shrink
from .units import Structure, StructureReport

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


class _Snows:  # what make_options reads: the name in its messages and the options class
    name, Options = "snows", SnowsOptions


def _block_of(owner: str, blocks: list[tuple[str, nn.Module]]) -> int | None:
    for i, (name, _) in enumerate(blocks):
        if name == "" or owner == name or owner.startswith(name + "."):
            return i
    return None


@across_ranks
def prune_structured(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    config: StructuredConfig | None = None,
    **options: Any,
) -> StructuredResult:
    """Remove whole MLP neurons and/or attention heads from ``model`` in place and repair it.

    The options are the fields of :class:`StructuredConfig` (each documented there), given as
    keywords, as a ``config``, or both (the keywords change the config's values; an unknown
    keyword is a TypeError naming the closest option), as for :func:`prunekit.prune`.

    ``ratio`` removes that fraction of every structure's units (the same count in every layer,
    so a Hugging Face config stays standard); ``params`` instead sets the fraction of the
    model's parameters to remove and finds the uniform ratio that gets closest, ``flops`` the fraction of
    their FLOPs per token (matrices plus attention products at the calibration length:
    ``structures/costs.py``). ``budget="global"`` ranks the units of all layers together instead (scores
    from one dense pass, divided by each layer's mean; ``structures/allocate.py``) and gives each
    layer its own count, keeping at least ``floor`` (default 0.25) of each structure's units; the
    widths then differ between layers: ``prunekit.load_structured`` reloads the saved model. ``method`` chooses
    the units (``wanda``: ``||W[:, j]||^2 E[x_j^2]``; ``magnitude``; ``flap``: ``||W[:, j]||^2 Var[x_j]``;
    ``obs``: greedy second-order removal). ``refine="lstsq"`` refits each consumer's kept
    columns to the dense layer's output on the same inputs (``target="pruned"``, the default;
    ``"dense"`` fits the dense model's output on the dense model's inputs instead, which
    measured worse on SmolLM2), with a ridge ``damp`` that pulls the kept columns towards their
    dense values; ``multiple_of`` rounds every MLP's kept width to a multiple of it (CPU matrix
    kernels can be slower on odd widths); ``bias=True`` also fits a bias (adding one, and setting ``mlp_bias`` /
    ``attention_bias`` in the config, where the consumer had none), ``"auto"`` only where it has one.
    ``refine="snows"`` starts from that least-squares refit and refits the consumer's kept
    columns against SNOWS's K-step lookahead loss (:mod:`prunekit.structures.snows`);
    ``refine_options`` are its :class:`~prunekit.oneshot.snows_options.SnowsOptions` (or a dict of
    them, e.g. ``{"k": 4, "max_cg": 20}``); ``warm_start="none"`` starts from the dropped columns.

    ``device``: each block is moved there with its inputs for its statistics, scores, refits and
    surgery, then back (the model stays where it is). Under ``torchrun`` (an initialised default
    process group) every rank calls this on the same model with its own calibration batches (or
    the same ones with ``shard_calibration=True``); the statistics are summed over the ranks, so
    every rank removes the same units and ends with the same weights.
    """
    if config is not None and not isinstance(config, StructuredConfig):
        raise TypeError(f"config must be a prunekit.StructuredConfig, got {type(config).__name__}; pass options as "
                        "keywords or build one with prunekit.StructuredConfig(...)")
    config = (config if config is not None else StructuredConfig()).replace(**options)
    structures = config.validate()
    if "channels" in structures:
        raise ValueError("structures='channels' is prunekit.prune_channels(model, calibration, ratio=... or flops=...); "
                         "prune_structured removes MLP neurons and attention heads")
    c = config  # the options as the names the steps below use
    ratio, params, flops, method, refine, bias, target = c.ratio, c.params, c.flops, c.method, c.refine, c.bias, c.target
    blocks, max_batches, damp, multiple_of, progress = c.blocks, c.max_batches, c.damp, c.multiple_of, c.progress
    budget, floor = c.budget, c.floor
    refine_options = c.refine_options
    if refine_options is not None and refine != "snows":
        raise ValueError(f"refine_options are SNOWS's options; pass refine='snows' with them (refine={refine!r})")
    snows = make_options(_Snows, refine_options) if refine == "snows" else None
    found = find_structures(model, structures)
    if not found:
        raise ValueError(f"the model has no recognised {'/'.join(structures)} structure (prunekit recognises "
                         "SwiGLU, BERT, GPT-2, fc1/fc2, nn.TransformerEncoderLayer and nn.Sequential(Linear, act, "
                         "Linear) MLPs, and q/k/v/o_proj attention with a head_dim, BERT, GPT-2 and "
                         "nn.MultiheadAttention heads)")
    needs_data = config.needs_data
    counts_data = calibration is not None and (budget == "global" or flops is not None)
    calls = collect_batches(calibration, max_batches) if needs_data or counts_data else []
    ranks = Ranks.current()
    if c.shard_calibration and calls:
        n_calls, calls = len(calls), shard(calls, ranks)
        if not calls:
            raise ValueError(f"shard_calibration=True shares {n_calls} calibration batches among {ranks.world} "
                             f"ranks, leaving rank {ranks.rank} none; pass at least {ranks.world} batches (smaller "
                             "batches, e.g. the CLI's --batch-size) or shard_calibration=False")
    agree(ranks, model, config)
    counts = counts_for(model, found, ratio, params, multiple_of, flops=flops, budget=budget, floor=floor,
                        method=method, calls=calls)
    for s in found:
        why = s.removable(counts[s.owner])
        if why:
            raise ValueError(f"{s.owner}: {why}; lower {'ratio' if ratio is not None else 'params' if params else 'flops'}")
    block_list = find_blocks(model, blocks)
    where = {s.owner: _block_of(s.owner, block_list) for s in found}
    outside = [o for o, b in where.items() if b is None]
    if outside:
        raise ValueError(f"structures {outside[:3]} lie outside the calibrated blocks; pass blocks= that contain them")
    result = StructuredResult(params_before=sum(p.numel() for p in model.parameters()))
    home = model_device(model)
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
                            undo, result, bar, snows, execution_device(c.device))
            else:
                for s in found:
                    result.reports.append(_prune_one(model, s, counts[s.owner], None, method, refine, bias, damp, undo))
                    bar.update()
            result.config = _update_config(model, found, undo)
    except BaseException:
        undo.restore()
        if c.device is not None:  # parameters replaced while their block was on the device come home too
            model.to(home)
        raise
    finally:
        bar.close()
        model.train(was_training)
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    return result


def _run_blocks(model, block_list, found, where, counts, calls, method, refine, bias, target, damp, undo, result, bar,
                snows=None, device: torch.device | None = None):
    home = model_device(model)
    device = device or home
    first = min(where.values())
    inputs = to_device(capture_inputs(model, block_list[first][1], to_device(calls, home)), device)
    dense_inputs = list(inputs) if target == "dense" else None
    last = max(where.values())
    targets = prunable_ids(model) if snows is not None else set()
    for b in range(first, last + 1):
        # SNOWS's lookahead reads on into the next block: it comes along to the device
        ahead = [m for _, m in block_list[b + 1:b + 2]] if snows is not None else []
        chain = block_list[b:] if device == home else block_list[b:b + 2]
        with to_block_device([block_list[b][1], *ahead], device, home):
            _run_block(model, chain, b, last, found, where, counts, inputs, dense_inputs, method, refine, bias,
                       damp, undo, result, bar, snows, targets)


def _run_block(model, chain, b, last, found, where, counts, inputs, dense_inputs, method, refine, bias, damp,
               undo, result, bar, snows, targets) -> None:
    """Prune the structures of block ``b`` (``chain[0]``, then the blocks SNOWS may read on into)
    on ``inputs`` (where the block is), then feed them on."""
    block_name, block = chain[0]
    mine = [s for s in found if where[s.owner] == b]
    dense_block = copy.deepcopy(block) if dense_inputs is not None and mine else None
    if mine:
        modules = dict(model.named_modules())
        args, kwargs = inputs[0]
        order, _ = execution_order(block, {s.owner: modules[s.consumer] for s in mine}, args, kwargs)
        mine.sort(key=lambda s: order.index(s.owner) if s.owner in order else len(order))
    for s in mine:
        stats = _gather(model, block, dense_block, s, inputs, dense_inputs, block_name)
        lookahead = None if snows is None else (snows, chain, inputs, targets)
        result.reports.append(_prune_one(model, s, counts[s.owner], stats, method, refine, bias, damp, undo,
                                         lookahead))
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
    stats.reduce(Ranks.current())  # every rank's batches, so every rank makes the same choices
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
               undo: Undo, lookahead=None) -> StructureReport:
    t0 = time.perf_counter()
    consumer = dict(model.named_modules())[s.consumer]
    w = matrix(consumer).double()
    b = None if consumer.bias is None else consumer.bias.detach().double()
    removed, w_obs = _choose(s, count, w, stats, method, damp) if count else ([], None)
    keep = [u for u in range(s.units) if u not in set(removed)]
    cols = s.column_groups()[keep].reshape(-1)
    # SNOWS starts from the least-squares refit (its warm start) unless told otherwise
    lstsq = refine == "lstsq" or (lookahead is not None and lookahead[0].warm_start != "none")
    fit_bias = lstsq and (bias is True or (bias == "auto" and b is not None))
    new_b = b
    if lstsq and stats is not None:
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
    if lookahead is not None:
        options, chain, inputs, targets = lookahead
        new_w, report.lookahead = snows_structure(model, s, cols, new_w, None if new_b is b else new_b,
                                                  chain, inputs, options, targets, undo)
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
        by_key: dict[str | None, set[int]] = {}
        for s in mlps:  # MLPs with different width fields (Qwen2-MoE's shared experts) are set apart
            by_key.setdefault(s.config_key, set()).add(matrix(modules[s.consumer]).shape[1])
        for key, group in by_key.items():
            if len(group) == 1 and key and hasattr(config, key):
                changed[key] = next(iter(group))
        # widths the config cannot hold: different per layer, or no config field for them (CLIP's fc1/fc2)
        widths = set().union(*(g for k, g in by_key.items() if len(g) > 1 or not (k and hasattr(config, k))))
        if widths:
            warnings.warn("MLP widths differ between layers or have no config field: the config keeps its "
                          "intermediate size and records "
                          f"the per-layer shapes ({CONFIG_KEY}); reload with prunekit.load_structured(folder)")
        if any(modules[s.consumer].bias is not None for s in mlps) and getattr(config, "mlp_bias", None) is False:
            changed["mlp_bias"] = True
    heads = [s for s in found if s.kind == "heads" and s.config_key]
    if config is not None and any(s.kind == "heads" and not s.config_key for s in found):
        warnings.warn("the config cannot express fewer attention heads here (head size = hidden / heads): it is "
                      f"left as it was and records the per-layer shapes ({CONFIG_KEY}); reload with prunekit.load_structured(folder)")
    if heads and config is not None:
        q = {modules[s.consumer].in_features // s.unit_size for s in heads}
        kv = {modules[s.kv_producers[0]].out_features // s.unit_size for s in heads}
        if len(q) == 1 and len(kv) == 1:
            changed.update(num_attention_heads=q.pop(), num_key_value_heads=kv.pop(), head_dim=heads[0].unit_size)
        else:
            warnings.warn("attention head counts differ between layers: the config keeps its head counts and records "
                          f"the per-layer shapes ({CONFIG_KEY}); reload with prunekit.load_structured(folder)")
        if any(modules[s.consumer].bias is not None for s in heads) and getattr(config, "attention_bias", None) is False:
            changed["attention_bias"] = True
    unexpressible = any(s.kind == "heads" and not s.config_key for s in found)
    if config is not None and ((mlps and widths) or (heads and not {"num_attention_heads"} <= set(changed))
                               or unexpressible or getattr(config, CONFIG_KEY, None)):
        touched = [n for s in found for n in (s.owner, *s.producers, *s.kv_producers, s.consumer)]
        changed[CONFIG_KEY] = merge_shapes(getattr(config, CONFIG_KEY, None), structure_shapes(model, touched))
    for key, value in changed.items():
        undo.set(config, key, value)
    return changed
