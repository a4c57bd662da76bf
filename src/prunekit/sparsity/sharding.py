"""Weights sharded by FSDP2: local views, and exact selections and counts over all shards.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor split along
dim 0, so each rank holds whole output rows of each layer. The training pruners work on these
local rows and agree through collectives of a few numbers per layer:

* per-row work is local: N:M groups run along the input axis, inside one row, so a group never
  crosses a shard boundary;
* a layer's (or all layers') k-th smallest score is found by bisection over the scores' bit
  patterns, all-reducing one count per layer per round (at most 64 rounds); ties at the k-th
  score are split in global index order (lower index kept, as :func:`~prunekit.sparsity.patterns.topk_keep`
  does), from an all-gather of each rank's tie count. The masks equal an unsharded run's.

Memory: a sorted int64 copy of the local scores (8 bytes per local weight, for the duration of a
mask update). Gathering full layers instead would hold, for a global budget, the whole model on
every rank: what FSDP exists to avoid. Plain (unsharded) tensors take the single-process code
paths; mixed with DTensors, they are counted once (on the group's rank 0).
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from .patterns import NM, keep_count, nm_mask, unstructured_mask

_FLIP = 0x7FFFFFFFFFFFFFFF


def is_sharded(t: object) -> bool:
    """True for a DTensor (an FSDP2 parameter, its gradient, optimizer state or a mask like it).

    ``torch.distributed.tensor`` is never imported here: a DTensor exists only once that module
    has been imported (by FSDP2 or the user), and importing it costs a second at every start."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when not sharded); in-place edits reach ``t``."""
    return t.to_local() if is_sharded(t) else t


def like(ref: torch.Tensor, local_part: torch.Tensor) -> torch.Tensor:
    """``local_part`` (this rank's rows) as a tensor sharded like ``ref``; unchanged if ``ref`` is plain."""
    if not is_sharded(ref):
        return local_part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_part, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def shard_like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A full (unsharded) tensor, e.g. masks from a file, split like ``ref``: each rank keeps its rows."""
    if not is_sharded(ref) or is_sharded(full):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(local(ref).device), ref.device_mesh, ref.placements, src_data_rank=None)


def check_sharding(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` is plain or sharded the FSDP2 way (1-D mesh, dim 0 or replicated)."""
    if not is_sharded(t):
        return
    from torch.distributed.tensor import Replicate, Shard

    ok = t.device_mesh.ndim == 1 and all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0)
                                         for p in t.placements)
    if not ok:
        raise ValueError(f"{name} is a DTensor with placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D "
                         "mesh; the pruners support FSDP2's default sharding (fully_shard on a 1-D mesh, "
                         "Shard(0)): drop shard_placement_fn, or prune outside the 2-D mesh")


def _group(tensors: Iterable[torch.Tensor]):
    """The process group of the sharded tensors, or None when none is sharded."""
    meshes = [t.device_mesh for t in tensors if is_sharded(t)]
    if not meshes:
        return None
    if any(m != meshes[0] for m in meshes):  # equal meshes: the same ranks (each fully_shard makes its own)
        raise ValueError("prunable weights are sharded over different device meshes; shard them all over "
                         "the same ranks")
    return meshes[0].get_group()


def _split(t: torch.Tensor) -> bool:
    if not is_sharded(t):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) for p in t.placements)


class _Shards:
    """Local scores of several tensors as sorted order-preserving int64 keys, with global counts."""

    def __init__(self, tensors: Sequence[torch.Tensor], group) -> None:
        self.group, self.tensors = group, list(tensors)
        first = dist.get_rank(group) == 0
        # a split tensor's local counts add up over the ranks; a whole one is counted on rank 0 only
        self.weight = torch.tensor([1 if _split(t) or first else 0 for t in self.tensors], dtype=torch.int64)
        self.keys = [_keys(local(t)) for t in self.tensors]
        self.sorted = [k.sort().values for k in self.keys]

    def bounds(self) -> tuple[list[int], list[int]]:
        """Per tensor, the smallest key minus one and the largest key, over all ranks."""
        big = torch.iinfo(torch.int64).max
        lo = [int(s[0]) if s.numel() else big for s in self.sorted]
        hi = [-int(s[-1]) if s.numel() else big for s in self.sorted]
        t = torch.tensor(lo + hi, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        n = len(self.sorted)
        return [int(v) - 1 for v in t[:n]], [-int(v) for v in t[n:]]

    def count_le(self, taus: Sequence[int]) -> list[int]:
        """Per tensor, the number of keys ``<= taus[i]`` over all ranks."""
        here = [int(torch.searchsorted(s, torch.tensor([tau]), right=True)) for s, tau in zip(self.sorted, taus)]
        c = torch.tensor(here, dtype=torch.int64) * self.weight
        dist.all_reduce(c, group=self.group)
        return c.tolist()


def _keys(x: torch.Tensor) -> torch.Tensor:
    """Flat int64 keys in the order of the float values (-0.0 read as +0.0)."""
    b = (x.detach().reshape(-1).double() + 0.0).view(torch.int64)
    return torch.where(b < 0, b ^ _FLIP, b)


def _value(key: int) -> float:
    return torch.tensor([key ^ _FLIP if key < 0 else key], dtype=torch.int64).view(torch.float64).item()


def _bisect(lo: list[int], hi: list[int], enough: Callable[[list[int]], list[bool]]) -> list[int]:
    """Per problem, the smallest integer in ``(lo, hi]`` for which ``enough`` holds (monotone, true at
    ``hi``). Every rank runs the same rounds: ``lo``/``hi`` and ``enough`` agree across ranks."""
    lo, hi = list(lo), list(hi)
    while any(h - l > 1 for l, h in zip(lo, hi)):
        mid = [(l + h) // 2 for l, h in zip(lo, hi)]
        for i, ok in enumerate(enough(mid)):
            if hi[i] - lo[i] > 1:
                lo[i], hi[i] = (lo[i], mid[i]) if ok else (mid[i], hi[i])
    return hi


def kth_smallest(groups: Sequence[Sequence[torch.Tensor]], ks: Sequence[int]) -> list[float]:
    """The ``ks[g]``-th smallest value (1-based) over all tensors of ``groups[g]`` and all their shards."""
    group = _group(t for g in groups for t in g)
    if group is None:
        return [float(torch.cat([t.detach().reshape(-1) for t in g]).kthvalue(k).values) for g, k in zip(groups, ks)]
    owner = [i for i, g in enumerate(groups) for _ in g]
    shards = _Shards([t for g in groups for t in g], group)
    lo_t, hi_t = shards.bounds()
    lo = [min(l for l, o in zip(lo_t, owner) if o == i) for i in range(len(groups))]
    hi = [max(h for h, o in zip(hi_t, owner) if o == i) for i in range(len(groups))]

    def enough(taus: list[int]) -> list[bool]:
        counts = shards.count_le([taus[o] for o in owner])
        return [sum(c for c, o in zip(counts, owner) if o == i) >= k for i, k in enumerate(ks)]

    return [_value(k) for k in _bisect(lo, hi, enough)]


def global_counts(scores: Mapping[str, torch.Tensor], to_prune: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Sharded :func:`prunekit.sparsity.allocation.global_counts`: entries each layer loses when the
    ``to_prune`` lowest scores of all layers go, each layer at most ``caps[n]``; ties at the last
    score filled in layer order. Needs ``0 < to_prune < sum(caps)``."""
    names = list(scores)
    shards = _Shards([scores[n] for n in names], _group(scores.values()))
    lo, hi = shards.bounds()
    cap = [caps[n] for n in names]

    def capped(tau: int) -> list[int]:
        return [min(c, k) for c, k in zip(cap, shards.count_le([tau] * len(names)))]

    tau = _bisect([min(lo)], [max(hi)], lambda t: [sum(capped(t[0])) >= to_prune])[0]
    pruned, upto = capped(tau - 1), capped(tau)
    left = to_prune - sum(pruned)
    for i in range(len(names)):  # ties at tau, filled in layer order
        extra = min(left, upto[i] - pruned[i])
        pruned[i] += extra
        left -= extra
    return dict(zip(names, pruned))


def unstructured_masks(scores: Mapping[str, torch.Tensor], sparsity: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per layer, :func:`~prunekit.sparsity.patterns.unstructured_mask` (exactly ``round(s * n)`` lowest scores
    pruned, ties by index) over all shards; the masks are sharded like the scores."""
    group = _group(scores.values())
    if group is None:
        return {n: unstructured_mask(s, sparsity[n]) for n, s in scores.items()}
    out: dict[str, torch.Tensor] = {}
    todo = {}
    for n, s in scores.items():
        keep = keep_count(s.numel(), sparsity[n])
        if keep in (0, s.numel()):
            out[n] = like(s, torch.full_like(local(s), keep > 0, dtype=torch.bool))
        else:
            todo[n] = s.numel() - keep
    if todo:
        names = list(todo)
        shards = _Shards([scores[n] for n in names], group)
        taus = _bisect(*shards.bounds(), lambda t: [c >= todo[n] for c, n in zip(shards.count_le(t), names)])
        below = shards.count_le([t - 1 for t in taus])
        ties = [u - b for u, b in zip(shards.count_le(taus), below)]
        eq = [k == t for k, t in zip(shards.keys, taus)]
        mine = torch.tensor([int(e.sum()) for e in eq], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        before = torch.stack(every[:dist.get_rank(group)]).sum(0) if dist.get_rank(group) else torch.zeros_like(mine)
        for i, n in enumerate(names):
            keep_ties = ties[i] - (todo[n] - below[i])  # ties kept: the lowest global indices
            start = int(before[i]) if _split(scores[n]) else 0
            rank_in_ties = start + torch.cumsum(eq[i], 0) - 1
            keep = (shards.keys[i] > taus[i]) | (eq[i] & (rank_in_ties < keep_ties))
            out[n] = like(scores[n], keep.view_as(local(scores[n])))
    return {n: out[n] for n in scores}


def nm_masks(scores: Mapping[str, torch.Tensor], pattern: NM) -> dict[str, torch.Tensor]:
    """:func:`~prunekit.sparsity.patterns.nm_mask` of each layer, on the local rows (groups stay in a row)."""
    out = {}
    for n, s in scores.items():
        width = s.numel() // max(s.shape[0], 1)
        if width % pattern.m:  # checked on the global shape: every rank raises alike
            raise ValueError(f"N:M pattern {pattern} needs the input dimension of {n!r} to be a multiple of "
                             f"{pattern.m}, got {width}; skip this layer or use another pattern")
        part = local(s)
        keep = nm_mask(part, pattern) if part.numel() else torch.zeros_like(part, dtype=torch.bool)
        out[n] = like(s, keep)
    return out


def count_true(masks: Iterable[torch.Tensor]) -> int:
    """True entries over all ``masks`` and all their shards (the same number on every rank)."""
    masks = list(masks)
    group = _group(masks)
    if group is None:
        return sum(int(m.sum()) for m in masks)
    first = dist.get_rank(group) == 0
    t = torch.tensor(sum(int(local(m).sum()) for m in masks if _split(m) or first), dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t)


def max_where(scores: Mapping[str, torch.Tensor], where: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the largest score where ``where`` is True over all shards (-inf where none is)."""
    part = torch.tensor([float(torch.where(local(where[n]), local(s), float("-inf")).max()) if local(s).numel()
                         else float("-inf") for n, s in scores.items()], dtype=torch.float64)
    group = _group(scores.values())
    if group is not None:
        dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(scores, part.tolist()))


def all_ranks(flag: bool, tensors: Iterable[torch.Tensor]) -> bool:
    """``flag`` and-ed over the ranks that share ``tensors``'s shards (``flag`` itself when plain)."""
    group = _group(tensors)
    if group is None:
        return flag
    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t)
