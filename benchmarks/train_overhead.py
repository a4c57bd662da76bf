"""Per-step overhead of pruning inside a training loop, all loops measured side by side.

A small ResNet (``resnet_mnist(width=16)``, ~0.27M weights) trains with SGD on fixed 28x28
batches. Loops: plain (baseline); prunekit ``MagnitudePruner`` (cubic to 90%, masks every 50
steps, weights + momentum masked every step); prunekit ``SoftThreshold`` (S-LATS, forward with
S_d(theta)); ``torch.nn.utils.prune`` (global L1 to 90%, re-pruned every 50 steps);
``torch.ao.pruning`` (a magnitude ``BaseSparsifier``, 90%, ``step()`` every 50 steps). The loops run in
interleaved rounds (order rotated each round) so machine noise hits all of them alike; the overhead
is the median over rounds of (loop time / baseline time in the same round) - 1.
Run: ``python benchmarks/train_overhead.py [--rounds 10 --steps 20 --threads 2]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.utils.prune as tprune
from torch import nn
from torch.ao.pruning import BaseSparsifier

from prunekit.training.schedules import Cubic
from prunekit.layers.targets import find_targets
from prunekit.training import MagnitudePruner, SoftThreshold
from prunekit.zoo.models import resnet_mnist

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class L1Sparsifier(BaseSparsifier):
    """torch.ao.pruning with per-tensor magnitude masks (its WeightNormSparsifier rejects 4-D conv
    weights); the mask is applied in the forward by torch.ao's FakeSparsity parametrization."""

    def update_mask(self, module, tensor_name, sparsity_level, **kwargs):
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        w = getattr(module.parametrizations, tensor_name).original.detach().abs()
        k = int(sparsity_level * w.numel())
        mask.data = w > w.flatten().kthvalue(k).values if k > 0 else torch.ones_like(mask)


def make_loop(kind: str, total: int):
    """Returns ``step()`` running one training step of a fresh model with pruning ``kind``."""
    torch.manual_seed(0)
    model = resnet_mnist(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    targets = find_targets(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    after = lambda k: None
    if kind == "prunekit MagnitudePruner":
        pruner = MagnitudePruner(model, opt, Cubic(0.9, total, end=int(0.7 * total), every=50), budget="global")
        after = lambda k: pruner.step()
    elif kind == "prunekit SoftThreshold":
        pruner = SoftThreshold(model, opt, total_steps=total, schedule="s_lats", final_threshold=0.05)
        after = lambda k: pruner.step()
    elif kind == "torch.nn.utils.prune":
        params = [(m, "weight") for m in targets.values()]

        def after(k):
            if k % 50 == 0 and k <= 0.7 * total:  # iterative: prune 30% of what is left, like a ramp
                tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.3)
    elif kind == "torch.ao.pruning":
        sparsifier = L1Sparsifier(defaults={"sparsity_level": 0.9})
        sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in targets])

        def after(k):
            if k % 50 == 0:
                sparsifier.step()
    state = {"k": 0}

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after(state["k"])
        state["k"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["baseline", "prunekit MagnitudePruner", "prunekit SoftThreshold", "torch.nn.utils.prune", "torch.ao.pruning"]
    total = (args.rounds + 1) * args.steps
    loops = {k: make_loop(k, total) for k in kinds}
    for loop in loops.values():  # warm-up round (not timed)
        for _ in range(args.steps):
            loop()
    times = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loops[k]()
            times[k].append((time.perf_counter() - t0) / args.steps)
    rows = []
    for k in kinds:
        ratios = [t / b for t, b in zip(times[k], times["baseline"])]
        rows.append({"loop": k, "ms_per_step": 1000 * statistics.median(times[k]),
                     "overhead_pct": 100 * (statistics.median(ratios) - 1),
                     "overhead_iqr_pct": [100 * (q - 1) for q in statistics.quantiles(ratios, n=4)[::2]]})
    md = ["# Per-step overhead of pruning in the training loop", "",
          f"`python benchmarks/train_overhead.py --rounds {args.rounds} --steps {args.steps} --threads {args.threads}`: "
          f"resnet_mnist(width=16), batch 64, SGD momentum, CPU, {args.threads} threads, {args.rounds} interleaved rounds of "
          f"{args.steps} steps after one warm-up round. Overhead = median over rounds of (loop / baseline in the same round) - 1.", "",
          *(["On the shared 2-core development machine (other jobs running), 2 intra-op threads were oversubscribed "
              "(2.4 s/step against 0.17 s/step with 1 thread), so this run used 1 thread.", ""] if args.threads == 1 else []),
          "| loop | ms / step (median) | overhead vs baseline | quartiles of the overhead |", "|---|---|---|---|"]
    for r in rows:
        q = r["overhead_iqr_pct"]
        md.append(f"| {r['loop']} | {r['ms_per_step']:.1f} | {r['overhead_pct']:+.1f}% | {q[0]:+.1f}% .. {q[1]:+.1f}% |")
    os.makedirs(RESULTS, exist_ok=True)
    open(os.path.join(RESULTS, "train_overhead.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
