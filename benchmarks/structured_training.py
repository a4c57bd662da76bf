"""Channel pruning during training on MNIST (``python benchmarks/structured_training.py``).

The demo ``small_cnn`` (trained 2 epochs, cached) is fine-tuned for the same number of steps with
each group pruner removing 50% and 70% of its multiply-adds: group S-LATS (``GroupSoftThreshold``,
``flops=``), group GMP (``GroupMagnitudePruner`` with ``Cubic``) and group cyclical (``Cyclical``,
3 cycles). Pruning runs over the first two thirds of the steps, the last third fine-tunes the
pruned network; ``finalize()`` then removes the channels and the smaller model is tested on the 10k
test images. Writes ``benchmarks/results/structured_training.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

import prunekit as pk
from prunekit.zoo.mnist import load_mnist
from prunekit.zoo.models import small_cnn
from prunekit.zoo.train import accuracy, cached, train_classifier

OUT = os.path.join(os.path.dirname(__file__), "results")


def dense() -> nn.Module:
    x, y = load_mnist("train")
    torch.manual_seed(0)
    return cached("demo_small_cnn_e2_s0", small_cnn,
                  lambda m: train_classifier(m, x, y, epochs=2, lr=0.05, seed=0))


def make_pruner(method: str, model, opt, flops: float, steps: int, example):
    ramp = round(2 * steps / 3)
    if method == "group S-LATS":
        return pk.GroupSoftThreshold(model, opt, total_steps=ramp, example=example, flops=flops, control_every=5)
    if method == "group GMP":
        return pk.GroupMagnitudePruner(model, opt, pk.Cubic(flops, total_steps=steps, end=ramp), example=example,
                                       of="flops")
    return pk.GroupMagnitudePruner(model, opt, pk.Cyclical(flops, total_steps=steps, cycles=3, start=0, end=ramp),
                                   example=example, of="flops")


def run(method: str, flops: float, args, x, y, xt, yt) -> dict:
    model = dense().train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    per_epoch = len(x) // args.batch
    steps = args.epochs * per_epoch
    pruner = make_pruner(method, model, opt, flops, steps, x[:2])
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
    masked = accuracy(model, xt, yt)
    result = pruner.finalize()
    return {"method": method, "target": flops, "flops_removed": result.flops_removed,
            "params": [result.params_before, result.params_after], "masked_accuracy": masked,
            "accuracy": accuracy(model, xt, yt), "steps": steps, "seconds": time.perf_counter() - start,
            "channels": {k: [n, n - len(result.removed[k])] for k, n in result.units_before.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=10000, help="training images used (the first n)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--targets", default="0.5,0.7")
    parser.add_argument("--methods", default="group S-LATS,group GMP,group cyclical")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = load_mnist("train")
    x, y = x[:args.train_size], y[:args.train_size]
    xt, yt = load_mnist("test")
    rows = []
    base = accuracy(dense(), xt, yt)
    for flops in (float(t) for t in args.targets.split(",")):
        for method in args.methods.split(","):
            rows.append(run(method, flops, args, x, y, xt, yt))
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "structured_training.json"), "w") as f:
        json.dump({"dense_accuracy": base, "args": vars(args), "rows": rows}, f, indent=1)
    lines = [f"small_cnn (dense {base:.2f}%), fine-tuned {args.epochs} epochs on {args.train_size} images "
             f"(batch {args.batch}, SGD lr {args.lr} momentum 0.9) while pruning channels over the first 2/3 "
             f"of the steps; accuracy on the 10k test images after finalize() (the smaller model).", "",
             "| method | FLOPs target | FLOPs removed | parameters | accuracy (%) | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {100 * r['target']:.0f}% | {100 * r['flops_removed']:.1f}% | "
              f"{r['params'][0]:,} -> {r['params'][1]:,} | {r['accuracy']:.2f} | {r['seconds']:.0f} |" for r in rows]
    lines.append("")
    lines.append("Command: `python benchmarks/structured_training.py " +
                 " ".join(f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items()) + "`")
    with open(os.path.join(OUT, "structured_training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
