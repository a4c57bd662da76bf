"""Channel pruning of MNIST CNNs in one shot (``python benchmarks/structured_vision.py``).

A model trained once (cached), then ``prune_channels`` at 30% and 50% of the multiply-adds
removed, every score x {no refit, lstsq} x {BatchNorm re-estimation off, on}, calibrated on
512 training images; test accuracy on the 10k test images, and the pruned model's CPU latency at
batch 64 against the dense model's in the same process (medians of alternated repeats).
Prints a markdown table; the machine's load makes the timings indicative only.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import prunekit as pk
from prunekit.zoo.mnist import load_mnist
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from prunekit.zoo.models import small_cnn
from prunekit.zoo.train import accuracy, cached, train_classifier

MODELS = {"small_cnn": ("demo_small_cnn_e2_s0", small_cnn, 2), "mobilenet": ("vision_mobilenet_e1_s0", mobilenet_v1_mnist, 1)}


def trained(name: str) -> torch.nn.Module:
    tag, factory, epochs = MODELS[name]
    x, y = load_mnist("train")

    def train(model):
        torch.manual_seed(0)
        return train_classifier(model, x, y, epochs=epochs, lr=0.05, seed=0)

    torch.manual_seed(0)
    return cached(tag, factory, train)


@torch.no_grad()
def latency_ratio(dense: torch.nn.Module, pruned: torch.nn.Module, repeats: int = 15) -> float:
    """Median dense time over median pruned time at batch 64 (> 1: the pruned model is faster)."""
    x = torch.randn(64, 1, 28, 28)
    times = {"dense": [], "pruned": []}
    for _ in range(3):
        dense(x), pruned(x)
    for _ in range(repeats):
        for key, model in (("dense", dense), ("pruned", pruned)):
            t = time.perf_counter()
            model(x)
            times[key].append(time.perf_counter() - t)
    return statistics.median(times["dense"]) / statistics.median(times["pruned"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="small_cnn,mobilenet")
    parser.add_argument("--scores", default="l2,bn,wanda")
    args = parser.parse_args()
    xt, yt = load_mnist("test")
    xc = load_mnist("train")[0][:512]
    calib = list(xc.split(64))
    print("| model | FLOPs removed | score | refine | BN re-est. | accuracy % | params | latency b64 (dense/pruned) |")
    print("|---|---:|---|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        dense = trained(name)
        print(f"| {name} | 0 (dense) | - | - | - | {accuracy(dense, xt, yt):.2f} | "
              f"{sum(p.numel() for p in dense.parameters()):,} | 1.00 |")
        for flops in (0.3, 0.5):
            for score in args.scores.split(","):
                for refine in (None, "lstsq"):
                    for bn in (False, True):
                        model = copy.deepcopy(dense)
                        r = pk.prune_channels(model, calib, flops=flops, score=score, refine=refine, recalibrate_bn=bn)
                        ratio = latency_ratio(dense, model) if (refine, bn) == ("lstsq", True) else float("nan")
                        print(f"| {name} | {100 * r.flops_removed:.1f}% | {score} | {refine} | {bn} | "
                              f"{accuracy(model, xt, yt):.2f} | {r.params_after:,} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
