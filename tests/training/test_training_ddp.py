"""Two gloo processes on this machine: masks and thresholds must be identical on every rank."""
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from helpers.two_ranks import run_two_ranks
from prunekit.training.schedules import Cyclical
from prunekit.training import STR, MagnitudePruner, SoftThreshold


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        results = {}
        for name in ("magnitude", "soft", "str"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            if name == "magnitude":
                pruner = MagnitudePruner(ddp, opt, Cyclical(0.9, 40, cycles=2, every=2), budget="global", targets=["0", "2"])
            elif name == "soft":
                pruner = SoftThreshold(ddp, opt, total_steps=40, target_sparsity=0.8, targets=["0", "2"])
            else:
                pruner = STR(ddp, opt, s_init=-3.0, s_weight_decay=0.2, targets=["0", "2"])
            g = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
            for _ in range(40):
                x, y = torch.randn(32, 16, generator=g), torch.randint(0, 8, (32,), generator=g)
                loss = nn.functional.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                pruner.step()
            masks = pruner.masks()
            thr = pruner.thresholds() if name == "str" else getattr(pruner, "d", {})
            results[name] = {"masks": {n: m.clone() for n, m in masks.items()}, "thr": thr,
                             "sparsity": pruner.sparsity(), "weights": {k: v.clone() for k, v in model.state_dict().items()}}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT seen once)
    finally:
        dist.destroy_process_group()


def test_masks_and_thresholds_identical_on_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as out:
        run_two_ranks(_worker, out, timeout=180, what="DDP", poll=5)
        r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    for name in r0:
        assert r0[name]["thr"] == r1[name]["thr"], name
        for n in r0[name]["masks"]:
            assert torch.equal(r0[name]["masks"][n], r1[name]["masks"][n]), (name, n)
        for k in r0[name]["weights"]:
            assert torch.equal(r0[name]["weights"][k], r1[name]["weights"][k]), (name, k)
        assert r0[name]["sparsity"] > 0.05, name
    assert abs(r0["magnitude"]["sparsity"] - 0.9) < 1e-3
    assert abs(r0["soft"]["sparsity"] - 0.8) < 0.01
