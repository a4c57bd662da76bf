"""Why the channel-pruned MNIST models gain less speed than FLOPs (``python benchmarks/vision_speed_why.py``).

1. Single layers at the zoo models' sizes, batch 64, 1 thread: a 3x3 conv (and a depthwise one)
   at its dense width and at the width a 50%-FLOPs uniform prune leaves, and the BatchNorm beside
   it; FLOPs kept against time kept (medians of alternated repeats).
2. Whole models: dense and pruned (``flops=0.5``, ``score="l2"``, ``refine=None``: latency depends
   on the shapes only) timed eager, after ``torch.fx.experimental.optimization.fuse`` (BatchNorm
   folded into the convs) and after ``torch.jit.optimize_for_inference`` (frozen TorchScript), the
   same treatment for both; batch-64 speed-up.

Writes ``benchmarks/results/vision_speed_why.md``. Run it on a quiet machine.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _vision_common as vc  # noqa: E402
import prunekit as pk  # noqa: E402
from structured_vision import trained  # noqa: E402

#: (in, out, kept in, kept out, height = width, depthwise): the zoo models' layers at 50% of FLOPs
LAYERS = [(8, 8, 5, 5, 28, False), (16, 16, 11, 11, 14, False), (32, 32, 22, 22, 7, False),
          (64, 64, 43, 43, 7, False), (128, 128, 87, 87, 4, False), (32, 32, 22, 22, 14, True),
          (64, 64, 43, 43, 7, True)]


@torch.no_grad()
def alternated(a: nn.Module, xa: torch.Tensor, b: nn.Module, xb: torch.Tensor, repeats: int = 40) -> tuple[float, float]:
    """Median ms of ``a(xa)`` and ``b(xb)``, alternated repeat by repeat after 3 warm-ups."""
    for _ in range(3):
        a(xa), b(xb)
    ta, tb = [], []
    for _ in range(repeats):
        for f, x, out in ((a, xa, ta), (b, xb, tb)):
            start = time.perf_counter()
            f(x)
            out.append(1e3 * (time.perf_counter() - start))
    return statistics.median(ta), statistics.median(tb)


def layer_lines() -> list[str]:
    lines = ["| layer (batch 64) | dense -> kept channels | FLOPs kept | conv ms dense -> pruned | time kept "
             "| BatchNorm ms dense -> pruned |", "|---|---|---:|---:|---:|---:|"]
    for c_in, c_out, k_in, k_out, hw, dw in LAYERS:
        dense = nn.Conv2d(c_in, c_out, 3, padding=1, groups=c_in if dw else 1, bias=False).eval()
        pruned = nn.Conv2d(k_in, k_out, 3, padding=1, groups=k_in if dw else 1, bias=False).eval()
        xd, xp = torch.randn(64, c_in, hw, hw), torch.randn(64, k_in, hw, hw)
        td, tp = alternated(dense, xd, pruned, xp)
        bd, bp = alternated(nn.BatchNorm2d(c_in).eval(), xd, nn.BatchNorm2d(k_in).eval(), xp)
        flops = k_in / c_in if dw else k_in * k_out / (c_in * c_out)
        lines.append(f"| {'depthwise ' if dw else ''}3x3 conv at {hw}x{hw} | {c_in} -> {k_in} | {flops:.2f} | "
                     f"{td:.3f} -> {tp:.3f} | {tp / td:.2f} | {bd:.3f} -> {bp:.3f} |")
    return lines


def compiled(model: nn.Module, how: str, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if how == "fx fuse":
        from torch.fx.experimental.optimization import fuse
        return fuse(model)
    if how == "jit optimize_for_inference":
        with torch.no_grad():
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
    return model


def model_lines() -> list[str]:
    lines = ["| model | eager | fx fuse (BatchNorm folded) | jit optimize_for_inference |", "|---|---:|---:|---:|"]
    x = torch.randn(64, 1, 28, 28)
    for name in vc.MODELS:
        dense = trained(name).eval()
        pruned = copy.deepcopy(dense)
        pk.prune_channels(pruned, vc.calibration(0, 256), flops=0.5, score="l2", refine=None, recalibrate_bn=False)
        cells = []
        for how in ("eager", "fx fuse", "jit optimize_for_inference"):
            try:
                d, p = compiled(dense, how, x), compiled(pruned, how, x)
                td, tp = alternated(d, x, p, x, repeats=30)
                cells.append(f"x{td / tp:.2f} ({td:.1f} / {tp:.1f} ms)")
            except Exception as e:  # noqa: BLE001 - a treatment that cannot take the model is reported
                cells.append(f"fails: {type(e).__name__}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()
    lines = ["# Why the pruned MNIST models gain less speed than FLOPs", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/vision_speed_why.py` (torch {torch.__version__}, 1 thread, load "
             f"average {load[0]:.2f} at the start). {__doc__.split(chr(10), 2)[2].split('Writes')[0].strip()}", "",
             "## Single layers", "", *layer_lines(), "",
             "## Whole models at 50% of the FLOPs (batch 64, dense / pruned)", "", *model_lines(), "",
             f"Load average at the end: {os.getloadavg()[0]:.2f}."]
    out = os.path.join(HERE, "results", "vision_speed_why.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
