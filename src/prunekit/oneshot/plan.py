"""What one ``prune()`` call will do, decided before any weight changes.

The checks that need the model (its prunable layers, their weights, the calibration data, the
pattern against each layer) and the per-layer budgets: everything before the block loop of
:mod:`prunekit.oneshot.pipeline`. The options themselves are checked by
:meth:`PruneConfig.validate <prunekit.oneshot.config.PruneConfig.validate>`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..calls import eval_mode, forward_until, to_device
from ..layers.base import LayerKind, kind_of, unit_name
from ..layers.base import known as known_kinds
from ..layers.routers import is_listed_expert
from ..layers.targets import check_plain_weights, forward_order, prunable
from ..sparsity.allocation import allocate
from ..sparsity.patterns import NM
from .calibration import InputKey, collect_batches, pick_input
from .coverage import find_gaps
from .config import Checked, PruneConfig
from .runtime.offload import Storage, home_device
from .runtime.placement import execution_device, stats_precision
from .runtime.ranks import Ranks, fingerprint, shard
from .stacks import find_stacks
from .solvers.selection import magnitude_scores


@dataclass
class Plan:
    """One call's decisions: the options and what they mean (``steps``), this process's
    calibration calls, the target modules and their units (``{unit name: (module name, unit)}``;
    each ``[d_out, d_in]`` matrix is a layer of its own), each unit's sparsity, the layers left
    dense and why, where the work runs and in which precision. ``storage`` holds every target's
    parameters, those left dense included; ``gaps`` the other weights expected pruned, which no
    layer kind handles (:mod:`.coverage`); ``blocks`` the modules calibrated in order
    (:mod:`.stacks`)."""

    config: PruneConfig
    steps: Checked
    calls: list[tuple[tuple, dict]]
    targets: dict[str, nn.Module]
    units: dict[str, tuple[str, str]]
    budgets: dict[str, float]
    skipped: dict[str, str]
    storage: Storage
    home: torch.device
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks
    gaps: dict[str, str]
    blocks: list[tuple[str, nn.Module]]

    @property
    def needs_data(self) -> bool:
        return bool(self.steps.needs)


def make_plan(model: nn.Module, calibration: Iterable[Any] | None, config: PruneConfig) -> Plan:
    """The :class:`Plan` of pruning ``model`` with ``config`` (ValueError/TypeError naming the
    option and the fix; the model is not changed). Under torch.distributed every rank must reach
    the same plan: the ranks compare the options, the model and the budgets."""
    c = config
    steps = c.validate()
    pattern = steps.pattern
    home = home_device(model)  # a model dispatched with accelerate may hold no weight in memory
    device = execution_device(c.device) or home
    needs_data = bool(steps.needs)
    if c.recalibrate_bn and calibration is None:
        raise ValueError("recalibrate_bn=True re-estimates BatchNorm statistics on the calibration data; "
                         "pass calibration batches (or recalibrate_bn=False)")
    calls = collect_batches(calibration, c.max_batches, c.input_key) if needs_data or c.recalibrate_bn else []
    found = prunable(model, types=c.types, include=c.include, exclude=c.exclude, include_head=c.include_head,
                     example_inputs=first_batch(calls, calibration, c.input_key))
    targets = found.layers
    _check_include(model, c.include, targets, c.types)
    if not targets:
        raise ValueError("the model has no prunable layer; check `types`, `include` and `exclude`"
                         + (f" (the only one is the head {found.head!r}: include_head=True)" if found.skipped else ""))
    check_plain_weights(targets)
    dtype = stats_precision(c.stats_dtype, _widest_dtype(targets))
    storage = Storage(model, targets)
    _check_weights(targets, storage)
    blocks = find_stacks(model, c.blocks, to_device(calls[0], home) if calls else None)
    gaps = find_gaps(model, blocks, c.include, c.exclude)
    if c.strict:
        _refuse_gaps(model, targets, gaps, calls)
        if needs_data:
            _refuse_idle_units(model, targets, to_device(calls, home), blocks)
    skipped = {**found.skipped, **_skip_misfits(targets, pattern, c.strict), **gaps}
    if not targets:
        raise ValueError(f"no layer fits pattern {pattern}: {skipped}")
    units = {unit_name(n, u): (n, u) for n, m in targets.items() for u in kind_of(m).units(m)}
    ranks, n_calls = Ranks.current(), len(calls)
    if c.shard_calibration and needs_data:
        calls = shard(calls, ranks)
        if not calls:
            raise ValueError(f"shard_calibration=True shares {n_calls} calibration batches among {ranks.world} ranks, "
                             f"leaving rank {ranks.rank} none; pass at least {ranks.world} batches (smaller "
                             "batches of the same samples: a lower batch size; prunekit prune under torchrun "
                             "splits its batches itself)")
    if isinstance(pattern, NM):
        budgets = {k: pattern.sparsity for k in units}
    else:
        # Only a global budget ranks weights; uniform and ERK need shapes alone (no copy).
        scores = {k: _unit_scores(n, u, c.budget == "global", targets, storage) for k, (n, u) in units.items()}
        budgets = allocate(scores, steps.sparsity, c.budget, cap=c.cap, overrides=c.overrides)
        budgets = _spread_within_modules(budgets, units, {k: t.numel() for k, t in scores.items()})
        del scores
    if ranks.active:
        args = dict(method=c.method, refine=c.refine, method_options=steps.method.options, pattern=pattern,
                    refine_options=steps.refine.options if steps.refine else None, sparsity=steps.sparsity,
                    budget=c.budget, cap=c.cap, overrides=c.overrides, include=c.include, exclude=c.exclude,
                    include_head=c.include_head, types=c.types, blocks=c.blocks, capture=c.capture,
                    input_key=c.input_key if not callable(c.input_key) else "a function",
                    sequential=c.sequential, strict=c.strict, max_batches=c.max_batches, device=device.type,
                    stats_dtype=dtype, shard_calibration=c.shard_calibration,
                    batches_before_sharding=n_calls if c.shard_calibration else None, skipped=skipped, exact=c.exact,
                    recalibrate_bn=c.recalibrate_bn)
        ranks.same("the arguments or the model", fingerprint(args, targets, budgets))
    return Plan(c, steps, calls, targets, units, budgets, skipped, storage, home, device, dtype, ranks, gaps, blocks)


def _widest_dtype(targets: dict[str, nn.Module]) -> torch.dtype:
    """float64 when any target holds a float64 matrix, else float32 (the statistics default)."""
    wide = any(t.dtype == torch.float64 for m in targets.values() for t in kind_of(m).parameters(m).values())
    return torch.float64 if wide else torch.float32


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


def first_batch(calls, calibration, input_key: InputKey = None) -> Any:
    """One calibration batch (the model's input of it: ``input_key``), to find the head by a
    forward (None without data, or when ``input_key`` does not apply: the head is then found
    without a forward)."""
    if calls:
        args, kwargs = calls[0]  # as_call gives positional or keyword arguments, not both
        return kwargs if kwargs else args
    if calibration is None or isinstance(calibration, (torch.Tensor, Mapping)):
        return None
    batch = next(iter(calibration), None)
    try:
        return None if batch is None else pick_input(batch, input_key)
    except (TypeError, ValueError, LookupError):
        return None


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


def _refuse_gaps(model: nn.Module, targets, gaps: Mapping[str, str], calls) -> None:
    """Under ``strict=True``: a ValueError for the first weight expected pruned that would be left
    dense, a parameter no layer kind handles or (with calibration data) a target whose forward
    one pass of the first batch never calls, so no statistics could exist for it."""
    if gaps:
        path, why = next(iter(gaps.items()))
        more = f" (and {len(gaps) - 1} more: {', '.join(list(gaps)[1:4])}...)" if len(gaps) > 1 else ""
        raise ValueError(f"strict=True: {path!r} is {why}, which would be left dense{more}; exclude it "
                         f"(exclude={path!r}), register a layer kind for it (prunekit.layers.base.register_kind), "
                         "or pass strict=False to leave it dense and listed")
    if not calls:
        return
    try:
        called = set(forward_order(model, targets, first_batch(calls, None)))
    except Exception:  # data that does not fit: the pipeline's own check says so, clearly
        return
    uncalled = [n for n in targets if n not in called and not is_listed_expert(model, n)]  # experts: below
    if uncalled:
        raise ValueError(f"strict=True: layer {uncalled[0]!r}'s forward is never called (its weight is used "
                         "functionally), so no calibration statistics exist for it"
                         + (f" (nor for {', '.join(map(repr, uncalled[1:4]))})" if len(uncalled) > 1 else "")
                         + f"; exclude it (exclude={uncalled[0]!r}), use a data-free method (magnitude), or pass "
                           "strict=False to leave it dense and listed")


@torch.no_grad()
def _refuse_idle_units(model: nn.Module, targets, calls, blocks) -> None:
    """Under ``strict=True``: a ValueError naming the first unit no calibration row reaches (an
    expert no token is routed to), over every batch through the model as it is, before any
    weight changes. Asked: kinds whose units can go without rows (:meth:`LayerKind.unit_rows`:
    fused experts) and the layers of older code's per-expert experts (called only with tokens);
    routing can still shift once earlier blocks are pruned, and the pipeline then refuses too
    (restoring the model)."""
    counted = {n: m for n, m in targets.items()
               if type(kind_of(m)).unit_rows is not LayerKind.unit_rows or is_listed_expert(model, n)}
    if not counted or not calls:
        return
    totals = {unit_name(n, u): 0 for n, m in counted.items() for u in kind_of(m).units(m)}

    def hook(name):
        def count(module, args, kwargs):
            rows = kind_of(module).unit_rows(module, args, kwargs)
            if rows is None:  # a listed expert's layer: every unit reads the call's rows
                first = args[0] if args and torch.is_tensor(args[0]) else None
                n = 0 if first is None or first.dim() == 0 else first.numel() // max(first.shape[-1], 1)
                rows = {u: n for u in kind_of(module).units(module)}
            for unit, n in rows.items():
                totals[unit_name(name, unit)] += n
        return count

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in counted.items()]
    try:
        with eval_mode(model):
            for args, kwargs in calls:
                forward_until(model, blocks[-1][1], args, kwargs)
    except Exception:  # data that does not fit: the pipeline's own check says so, clearly
        return
    finally:
        for h in handles:
            h.remove()
    idle = [k for k, rows in totals.items() if rows == 0]
    if idle:
        name = next(n for n in counted if idle[0].startswith(n + ".") or idle[0] == n)
        more = f" (and {len(idle) - 1} more: {', '.join(idle[1:4])}...)" if len(idle) > 1 else ""
        raise ValueError(f"strict=True: no calibration token is routed to {idle[0]!r}{more}, so it has no "
                         f"statistics; calibrate on more or more varied data, exclude the layer "
                         f"(exclude={name!r}), or pass strict=False to prune such experts by magnitude (reported "
                         "in result.fallbacks)")


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
