"""Two gloo processes, the model sharded with FSDP2 (``fully_shard``): every pruner must give the masks
and weights of an unsharded run, the same sparsity on every rank, clean optimizer state, and a run
resumed from a torch.distributed.checkpoint must continue bit for bit."""
import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from helpers.two_ranks import run_two_ranks
from prunekit.training.schedules import Cubic, Cyclical
from prunekit.training import STR, MagnitudePruner, SoftThreshold

fsdp = pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

STEPS, SAVE_AT = 8, 5
T = ["0", "2", "4"]  # the 1-row head too: rank 1 holds an empty shard of it
CONFIGS = {  # name: (pruner factory, optimizer)
    "uniform": (lambda m, o: MagnitudePruner(m, o, targets=T, schedule=Cubic(0.8, STEPS, every=2)), "sgd"),
    "global": (lambda m, o: MagnitudePruner(m, o, targets=T, schedule=Cubic(0.8, STEPS, every=2), budget="global", cap=0.95), "adam"),
    "erk": (lambda m, o: MagnitudePruner(m, o, targets=T, schedule=Cubic(0.8, STEPS, every=2), budget="erk"), "sgd"),
    "2:4": (lambda m, o: MagnitudePruner(m, o, targets=T, schedule=Cubic(0.5, STEPS, every=2), pattern="2:4"), "adam"),
    "cyclical": (lambda m, o: MagnitudePruner(m, o, targets=T, schedule=Cyclical(0.8, STEPS, cycles=2, every=1), budget="global",
                                              mode="keep"), "sgd"),
    "soft_global": (lambda m, o: SoftThreshold(m, o, targets=T, total_steps=STEPS, target_sparsity=0.7, control_every=2), "sgd"),
    "soft_layer": (lambda m, o: SoftThreshold(m, o, targets=T, total_steps=STEPS, target_sparsity=0.7, budget="uniform",
                                              control_every=3, project=True), "adam"),
    "str": (lambda m, o: STR(m, o, targets=T, s_init=-2.0, final_sparsity=0.6), "sgd"),
    "soft_greedy": (lambda m, o: SoftThreshold(m, o, targets=T, total_steps=STEPS, schedule="constant",
                                               final_threshold=0.02, shift_init=True, greedy=True), "sgd"),
    "given_masks": (lambda m, o: MagnitudePruner(m, o, targets=T, schedule=0.5, masks=_checkerboard()), "adam"),
}


def _checkerboard() -> dict:
    """Full (unsharded) masks, as read from a file: split like the weights by the pruner."""
    return {n: torch.arange(r * c).reshape(r, c) % 2 == 0 for n, (r, c) in zip(T, ((24, 16), (12, 24), (1, 12)))}
RESUMED = ("cyclical", "soft_global", "str")


def _model(shard: bool) -> nn.Module:
    torch.manual_seed(0)  # rows: 24 (12/12 per rank), 12 (6/6), 1 (1/0: rank 1 holds no row)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 1))
    if shard:
        for layer in model[::2]:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
    return model


def _run(name: str, shard: bool, ckpt: str | None = None, resume: bool = False):
    """Train STEPS steps (the same data on every rank, so FSDP's averaged gradient is the unsharded one)."""
    factory, kind = CONFIGS[name]
    model = _model(shard)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) if kind == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    pruner = factory(model, opt)
    start = 0
    # get_state_dict names every optimized parameter after a module: STR's thresholds ride along with the model
    holder = nn.ModuleDict({"model": model, "str": pruner.s}) if isinstance(pruner, STR) else model
    if resume:
        msd, osd = get_state_dict(holder, opt)
        state = {"model": msd, "optim": osd, "pruner": pruner.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(holder, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        pruner.load_state_dict(state["pruner"])
        start = SAVE_AT
    for step in range(start, STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if ckpt is not None and not resume and step + 1 == SAVE_AT:
            msd, osd = get_state_dict(holder, opt)
            dcp.save({"model": msd, "optim": osd, "pruner": pruner.state_dict()}, checkpoint_id=ckpt)
    return model, opt, pruner


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check(name: str, out: str) -> dict:
    """Compare the sharded run with the unsharded one on this rank; returns what ranks must agree on."""
    model, opt, pruner = _run(name, shard=True, ckpt=os.path.join(out, name) if name in RESUMED else None)
    ref_model, _, ref = _run(name, shard=False)
    masks, ref_masks = pruner.masks(), ref.masks()
    full = {n: _full(m) for n, m in masks.items()}
    for n in ref_masks:
        assert torch.equal(full[n], ref_masks[n]), (name, n)
    weights = {k: _full(v.detach()) for k, v in model.state_dict().items()}
    for k, v in ref_model.state_dict().items():
        assert torch.equal(weights[k], v), (name, k)
    s = pruner.sparsity()
    assert s == ref.sparsity(), name  # the global value, not this rank's share
    if isinstance(pruner, MagnitudePruner):  # pruned entries are zero in the weights and the optimizer state
        for n, w in pruner.weights.items():
            assert not _full(w.detach())[~full[n]].any(), (name, n)
            for v in opt.state[w].values():
                if torch.is_tensor(v) and v.shape == w.shape:
                    assert not _full(v)[~full[n]].any(), (name, n)
    if isinstance(pruner, STR):
        assert pruner.thresholds() == ref.thresholds()
    final = {n: _full(m) for n, m in pruner.finalize().items()}
    ref_final = ref.finalize()
    for n in ref_final:
        assert torch.equal(final[n], ref_final[n]), (name, "finalize", n)
    assert getattr(pruner, "cycle_stats", None) == getattr(ref, "cycle_stats", None)
    if name in RESUMED:  # saved at step SAVE_AT by the run above, resumed in fresh objects
        model2, _, pruner2 = _run(name, shard=True, ckpt=os.path.join(out, name), resume=True)
        assert pruner2.step_count == STEPS
        for k, v in model2.state_dict().items():
            assert torch.equal(_full(v.detach()), weights[k]), (name, "resumed", k)
        assert pruner2.sparsity() == s, name
        for n, m in pruner2.finalize().items():
            assert torch.equal(_full(m), final[n]), (name, "resumed", n)
        assert getattr(pruner2, "cycle_stats", None) == getattr(pruner, "cycle_stats", None)
    return {"masks": full, "weights": weights, "sparsity": s, "cycles": len(getattr(pruner, "cycle_stats", []))}


def _check_column_sharding_is_refused() -> None:
    from torch.distributed.tensor import Shard

    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))
    fsdp.fully_shard(model, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: _full(v.detach()).clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"parameter 0\.weight .*Shard\(dim=1\).*shard_placement_fn"):
        MagnitudePruner(model, opt, 0.5)
    assert all(torch.equal(_full(v.detach()), before[k]) for k, v in model.state_dict().items())


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _check(name, out) for name in CONFIGS}
        _check_column_sharding_is_refused()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT seen once)
    finally:
        dist.destroy_process_group()


def test_pruners_under_fsdp2_match_an_unsharded_run_on_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as out:
        run_two_ranks(_worker, out, timeout=180, what="FSDP", poll=2)
        r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    for name in CONFIGS:
        assert r0[name]["sparsity"] == r1[name]["sparsity"], name
        for n, m in r0[name]["masks"].items():
            assert torch.equal(m, r1[name]["masks"][n]), (name, n)
    assert r0["uniform"]["sparsity"] == r0["global"]["sparsity"] == 1.0 - 137 / 684  # 547 of 684 pruned either way
    assert abs(r0["uniform"]["sparsity"] - 0.8) < 1e-3
    assert r0["2:4"]["sparsity"] == 0.5
    assert 0.5 < r0["soft_global"]["sparsity"] < 0.9
    assert r0["given_masks"]["sparsity"] == 0.5 and torch.equal(r0["given_masks"]["masks"]["2"], _checkerboard()["2"])
    assert r0["cyclical"]["cycles"] == 1  # a second cycle ended at finalize, and its statistics agree
