"""Selections over DTensor shards equal the single-process ones on the full tensors (ties, uneven and
empty shards, plain tensors mixed in); plain tensors take the single-process paths."""
import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers.two_ranks import run_two_ranks
from prunekit.sparsity import sharding
from prunekit.sparsity.allocation import global_counts
from prunekit.sparsity.masks import MaskSet
from prunekit.sparsity.patterns import NM, nm_mask, unstructured_mask

pytest.importorskip("torch.distributed.tensor")
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh  # noqa: E402


def _scores():
    """Integer-valued scores (many ties), with -0.0 and +0.0, rows 7 (4/3 per rank), 5 (3/2) and 1 (1/0)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (7, 8), generator=g).float()
    a[0, :3] = torch.tensor([-0.0, 0.0, -0.0])
    b = torch.randint(-2, 4, (5, 4, 1, 2), generator=g).double()  # a conv weight
    c = torch.randint(0, 3, (1, 12), generator=g).float()
    return {"a": a, "b": b, "c": c}


def test_plain_tensors_take_the_single_process_paths():
    s = _scores()
    t = torch.randn(3, 4)
    assert not sharding.is_sharded(t) and sharding.local(t) is t and sharding.like(t, t) is t
    assert sharding.shard_like(t, t) is t
    sharding.check_sharding("w", t)  # nothing to check
    sp = {"a": 0.5, "b": 0.3, "c": 0.75}
    masks = sharding.unstructured_masks(s, sp)
    for n in s:
        assert torch.equal(masks[n], unstructured_mask(s[n], sp[n]))
    assert sharding.kth_smallest([[s["a"], s["c"]], [s["b"]]], [10, 7]) == [
        float(torch.cat([s["a"].reshape(-1), s["c"].reshape(-1)]).kthvalue(10).values), float(s["b"].reshape(-1).kthvalue(7).values)]
    assert sharding.count_true([s["a"] > 2, s["c"] > 0]) == int((s["a"] > 2).sum() + (s["c"] > 0).sum())
    assert sharding.max_where({"a": s["a"]}, {"a": s["a"] < 3}) == {"a": 2.0}
    assert sharding.max_where({"a": s["a"]}, {"a": s["a"] < -5}) == {"a": float("-inf")}
    assert sharding.all_ranks(False, [t]) is False
    nm = sharding.nm_masks({"a": s["a"]}, NM(2, 4))
    assert torch.equal(nm["a"], nm_mask(s["a"], NM(2, 4)))
    with pytest.raises(ValueError, match="input dimension of 'x' to be a multiple of 4"):
        sharding.nm_masks({"x": torch.randn(3, 6)}, NM(2, 4))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = _scores()
        sh = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
        assert sharding.local(sh["c"]).numel() == (12 if rank == 0 else 0)
        mixed = {**sh, "p": torch.arange(10.0).flip(0) % 4}  # a plain (replicated) tensor among shards
        full_mixed = {**full, "p": mixed["p"]}
        for sp in ({"a": 0.5, "b": 0.3, "c": 0.75, "p": 0.4}, {"a": 0.0, "b": 0.95, "c": 0.99, "p": 0.1}):
            masks = sharding.unstructured_masks(mixed, sp)
            for n in full_mixed:
                got = masks[n].full_tensor() if sharding.is_sharded(masks[n]) else masks[n]
                assert torch.equal(got, unstructured_mask(full_mixed[n], sp[n])), (n, sp)
        for cap, k in ((None, 70), (0.6, 70), (0.5, 3)):
            caps = {n: t.numel() if cap is None else round(cap * t.numel()) for n, t in full_mixed.items()}
            assert global_counts(mixed, k, cap) == global_counts(full_mixed, k, cap), (cap, k)
            counts = sharding.global_counts(mixed, k, caps)
            assert sum(counts.values()) == k
        groups = [[sh["a"], mixed["p"]], [sh["b"]], [sh["c"]]]
        full_groups = [[full["a"], mixed["p"]], [full["b"]], [full["c"]]]
        for ks in ([1, 1, 1], [33, 20, 12], [66, 40, 5]):
            want = [float(torch.cat([t.reshape(-1) for t in g]).kthvalue(k).values) for g, k in zip(full_groups, ks)]
            assert sharding.kth_smallest(groups, ks) == want, ks
        nm = sharding.nm_masks({"a": sh["a"], "c": sh["c"]}, NM(2, 4))
        assert torch.equal(nm["a"].full_tensor(), nm_mask(full["a"], NM(2, 4)))
        assert torch.equal(nm["c"].full_tensor(), nm_mask(full["c"], NM(2, 4)))
        assert sharding.count_true([sh["a"] > 2, mixed["p"] > 1]) == int((full["a"] > 2).sum() + (mixed["p"] > 1).sum())
        assert sharding.max_where(sh, {n: t < 2 for n, t in sh.items()}) == {
            n: float(t[t < 2].max()) for n, t in full.items()}
        assert sharding.all_ranks(rank == 0, [sh["a"]]) is False
        # MaskSet: sparsity over all shards; masks from a file (full) applied to sharded weights
        ms = MaskSet({n: t > 2 for n, t in sh.items()})
        kept = sum(int((t > 2).sum()) for t in full.values())
        assert ms.sparsity() == 1.0 - kept / sum(t.numel() for t in full.values())
        model = nn.Linear(8, 7)
        model.weight = nn.Parameter(distribute_tensor(full["a"] + 1, mesh, [Shard(0)]))
        plain = MaskSet({"": full["a"] > 2})
        assert not plain.verify(model)
        plain.apply(model)
        assert plain.verify(model)
        assert torch.equal(model.weight.full_tensor(), (full["a"] + 1) * (full["a"] > 2))
        with pytest.raises(ValueError, match="Shard\\(dim=1\\)"):
            sharding.check_sharding("w", distribute_tensor(full["a"], mesh, [Shard(1)]))
        torch.save("ok", os.path.join(out, f"rank{rank}"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT seen once)
    finally:
        dist.destroy_process_group()


def test_selections_over_shards_equal_the_full_tensors_on_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as out:
        run_two_ranks(_worker, out, timeout=120, what="sharding", poll=1)
        assert all(torch.load(os.path.join(out, f"rank{r}")) == "ok" for r in (0, 1))
