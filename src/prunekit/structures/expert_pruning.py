"""``prunekit.prune_experts``: remove whole experts of mixture-of-experts layers in one shot.

Block by block, in order, on inputs from the already-pruned blocks before it (as ``prune()`` and
``prune_structured()`` do): the block runs on its calibration inputs while each MoE layer's
routing is scored (:mod:`.expert_scores`), the lowest-scoring experts of every layer go with
their router rows (:mod:`.experts`), and the pruned block's outputs feed the next block. The same
count goes in every layer, so the config (``num_local_experts`` / ``num_experts``) stays standard
and ``save_pretrained`` writes a checkpoint plain ``from_pretrained`` loads.

Why not ``prune_structured(structures="experts")``: its options choose and refit input columns
of one consumer matrix (``method="wanda"``, ``refine="lstsq"``); an expert is chosen from the
router's behaviour and nothing is refit, so none of those options would apply.

Any failure, Ctrl-C included, puts the model back exactly as it was (the undo log of
:mod:`.surgery`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..calls import eval_mode
from ..oneshot.blocks import capture_inputs, find_blocks, propagate
from ..oneshot.calibration import collect_batches
from .expert_scores import SCORES, ExpertRecorder, ExpertScores
from .experts import ExpertSite, find_experts, remove_experts
from .surgery import Undo

#: config fields that hold the expert count, in the order they are looked for
CONFIG_KEYS = ("num_local_experts", "num_experts")


@dataclass
class ExpertReport:
    """One MoE layer: experts before/after, the experts removed, and the share of the calibration
    tokens' top-k choices (``routed_removed``) and router weight (``weight_removed``) they held."""

    owner: str
    experts_before: int
    experts_after: int
    removed: list[int] = field(default_factory=list)
    routed_removed: float = 0.0
    weight_removed: float = 0.0


@dataclass
class ExpertsResult:
    """What ``prune_experts`` did: a report and the scores per layer, parameters before/after
    (counted from the model's tensors), the config fields changed, and the wall time."""

    reports: list[ExpertReport] = field(default_factory=list)
    scores: dict[str, ExpertScores] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'experts':>8s} {'routed removed':>15s} {'weight removed':>15s}  removed"]
        for r in self.reports:
            lines.append(f"{r.owner:40s} {f'{r.experts_before}->{r.experts_after}':>8s} {r.routed_removed:>15.2%} "
                         f"{r.weight_removed:>15.2%}  {r.removed}")
        removed = 1 - self.params_after / self.params_before if self.params_before else 0.0
        lines.append(f"parameters {self.params_before:,} -> {self.params_after:,} ({100 * removed:.1f}% fewer) "
                     f"in {self.seconds:.1f} s")
        return "\n".join(lines)


def lowest(values: torch.Tensor, count: int) -> list[int]:
    """The ``count`` indices of lowest value, sorted; ties go to the lower index (deterministic)."""
    order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    return sorted(order[:count])


def _counts(sites: list[ExpertSite], ratio: float | None, count: int | None) -> dict[str, int]:
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio= (fraction of each layer's experts) or count= (experts to "
                         "remove from every layer)")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    out = {}
    for s in sites:
        n = round(ratio * s.num_experts) if ratio is not None else count
        most = s.num_experts - s.top_k
        if n > most:
            given = f"ratio={ratio}" if ratio is not None else f"count={count}"
            raise ValueError(f"{s.owner}: {given} removes {n} of {s.num_experts} experts, leaving "
                             f"{s.num_experts - n}, fewer than the {s.top_k} experts each token is routed to "
                             f"(num_experts_per_tok); at most {most} can go (ratio <= {most / s.num_experts:.3g})")
        out[s.owner] = n
    return out


def _block_of(owner: str, blocks: list[tuple[str, nn.Module]]) -> int | None:
    for i, (name, _) in enumerate(blocks):
        if name == "" or owner == name or owner.startswith(name + "."):
            return i
    return None


def _sweep(model: nn.Module, sites: list[ExpertSite], calls, blocks: Sequence[str] | None, counts: dict[str, int],
           method: str, undo: Undo | None, result: ExpertsResult) -> None:
    """Score every site block by block; remove ``counts`` experts per site where ``undo`` is given."""
    block_list = find_blocks(model, blocks)
    where = {s.owner: _block_of(s.owner, block_list) for s in sites}
    outside = [o for o, b in where.items() if b is None]
    if outside:
        raise ValueError(f"MoE layers {outside[:3]} lie outside the calibrated blocks; pass blocks= that contain them")
    first, last = min(where.values()), max(where.values())
    inputs = capture_inputs(model, block_list[first][1], calls)
    for b in range(first, last + 1):
        block = block_list[b][1]
        mine = [s for s in sites if where[s.owner] == b]
        recorders = []
        try:
            for s in mine:
                result.scores[s.owner] = ExpertScores(s.num_experts)
                recorders.append(ExpertRecorder(model.get_submodule(s.experts), result.scores[s.owner]))
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            for r in recorders:
                r.close()
        for s in mine:
            if undo is not None:
                result.reports.append(_remove(model, s, counts[s.owner], result.scores[s.owner], method, undo))
        if b < last:
            propagate(block, inputs)


def _remove(model, s: ExpertSite, count: int, scores: ExpertScores, method: str, undo: Undo) -> ExpertReport:
    removed = lowest(scores.score(method), count)
    keep = [e for e in range(s.num_experts) if e not in set(removed)]
    freq, weight = scores.score("frequency"), scores.score("weight")
    report = ExpertReport(s.owner, s.num_experts, len(keep), removed,
                          routed_removed=float(freq[removed].sum() / max(float(freq.sum()), 1e-300)),
                          weight_removed=float(weight[removed].sum() / max(float(weight.sum()), 1e-300)))
    if removed:
        remove_experts(model, s, keep, undo)
    return report


def _sites(model: nn.Module) -> list[ExpertSite]:
    sites = find_experts(model)
    if not sites:
        raise ValueError("the model has no recognised mixture-of-experts layer (prunekit recognises a router "
                         "'gate'/'router' beside fused 'experts' with 3-D gate_up_proj/down_proj: transformers 5's "
                         "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)")
    return sites


@torch.no_grad()
def score_experts(model: nn.Module, calibration: Iterable[Any], *, blocks: Sequence[str] | None = None,
                  max_batches: int | None = None) -> dict[str, ExpertScores]:
    """``{MoE layer: ExpertScores}`` of the unpruned model on ``calibration``; the model is not changed."""
    sites = _sites(model)
    calls = collect_batches(calibration, max_batches)
    result = ExpertsResult()
    with eval_mode(model):
        _sweep(model, sites, calls, blocks, {}, "reap", None, result)
    return result.scores


def prune_experts(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    ratio: float | None = None,
    count: int | None = None,
    method: str = "reap",
    blocks: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> ExpertsResult:
    """Remove whole experts from every mixture-of-experts layer of ``model`` in place.

    ``ratio`` removes that fraction of each layer's experts (rounded), ``count`` that many from
    every layer; at least ``num_experts_per_tok`` experts stay in each. ``method`` ranks them
    (lowest goes): ``"reap"`` (default: mean router weight x expert output norm), ``"weight"``
    (mean router weight received) or ``"frequency"`` (how often in the top-k). Ties go to the
    lower expert index. A Qwen2-MoE shared expert is never removed.
    """
    start = time.perf_counter()
    if method not in SCORES:
        raise ValueError(f"method must be one of {', '.join(SCORES)} for experts, got {method!r}")
    sites = _sites(model)
    counts = _counts(sites, ratio, count)
    calls = collect_batches(calibration, max_batches)
    result = ExpertsResult(params_before=sum(p.numel() for p in model.parameters()))
    undo = Undo()
    try:
        with eval_mode(model), torch.no_grad():
            _sweep(model, sites, calls, blocks, counts, method, undo, result)
            result.config = _update_config(model, sites, counts, undo)
    except BaseException:
        undo.restore()
        raise
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    return result


def _update_config(model: nn.Module, sites: list[ExpertSite], counts: dict[str, int], undo: Undo) -> dict[str, Any]:
    """Write the new expert count into the config when every layer has the same one."""
    config = getattr(model, "config", None)
    left = {s.num_experts - counts[s.owner] for s in sites}
    before = {s.num_experts for s in sites}
    if config is None or len(left) != 1 or len(before) != 1:
        return {}
    own = [k for k in CONFIG_KEYS if k in vars(config)]  # the field itself, not an alias of it
    key = next((k for k in (*own, *CONFIG_KEYS) if getattr(config, k, None) == before.pop()), None)
    if key is None:
        return {}
    value = left.pop()
    undo.set(config, key, value)
    return {key: value}
