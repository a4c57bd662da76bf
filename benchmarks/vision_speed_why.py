"""Why the channel-pruned MNIST models gain less speed than FLOPs (``python benchmarks/vision_speed_why.py``).

1. Single layers at the zoo models' sizes, batch 64, 1 thread: a 3x3 conv (a depthwise one, the
   MobileNet's first 1x1) at its dense width and at the width a 50%-FLOPs uniform prune leaves, in
   PyTorch's default (NCHW) memory format and in channels_last, and the BatchNorm beside it; FLOPs
   kept against time kept (medians of alternated repeats).
2. Whole models: dense and pruned (``flops=0.5``, ``score="l2"``, ``refine=None``: latency depends
   on the shapes only) timed eager, in channels_last (``model.to(memory_format=...)``), after
   ``torch.fx.experimental.optimization.fuse`` (BatchNorm folded into the convs) and after
   ``torch.jit.optimize_for_inference`` (frozen TorchScript), the same treatment for both;
   batch-64 speed-up.
3. Other allocations of the same FLOPs: random per-group widths of the ResNet and the MobileNet
   (each group keeps 1/4, 3/8, ..., all of its channels) that remove 50-56% of the FLOPs, timed
   (refine=None: the shapes decide), and the fastest ``top`` of them pruned for real (l2 choice,
   least-squares refit, BatchNorm re-estimated, as ``prune_channels`` does) to show what their
   speed costs and how far any allocation of these FLOPs gets.

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
from prunekit.oneshot.calibration import collect_batches  # noqa: E402
from prunekit.structures.channel_budget import flops_counts, macs  # noqa: E402
from prunekit.structures.channel_refit import repair  # noqa: E402
from prunekit.structures.channel_scores import channel_scores, lowest  # noqa: E402
from prunekit.structures.channel_surgery import shrink_channels  # noqa: E402
from prunekit.structures.channels_graph import find_channel_groups  # noqa: E402
from prunekit.structures.surgery import Undo  # noqa: E402
from structured_vision import trained  # noqa: E402

#: (in, out, kept in, kept out, height = width, depthwise, kernel): the zoo models' layers at 50% of FLOPs
LAYERS = [(8, 8, 5, 5, 28, False, 3), (16, 16, 11, 11, 14, False, 3), (32, 32, 22, 22, 7, False, 3),
          (64, 64, 43, 43, 7, False, 3), (128, 128, 87, 87, 4, False, 3), (8, 8, 5, 5, 28, True, 3),
          (32, 32, 22, 22, 14, True, 3), (64, 64, 43, 43, 7, True, 3), (8, 16, 5, 11, 28, False, 1)]
CL = torch.channels_last
TITLES = {"resnet": "ResNet", "mobilenet": "MobileNet"}


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
             "| channels_last ms dense -> pruned | time kept | BatchNorm ms dense -> pruned |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c_in, c_out, k_in, k_out, hw, dw, k in LAYERS:
        dense = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=c_in if dw else 1, bias=False).eval()
        pruned = nn.Conv2d(k_in, k_out, k, padding=k // 2, groups=k_in if dw else 1, bias=False).eval()
        xd, xp = torch.randn(64, c_in, hw, hw), torch.randn(64, k_in, hw, hw)
        td, tp = alternated(dense, xd, pruned, xp)
        cd, cp = alternated(copy.deepcopy(dense).to(memory_format=CL), xd.contiguous(memory_format=CL),
                            copy.deepcopy(pruned).to(memory_format=CL), xp.contiguous(memory_format=CL))
        bd, bp = alternated(nn.BatchNorm2d(c_in).eval(), xd, nn.BatchNorm2d(k_in).eval(), xp)
        flops = k_in / c_in if dw else k_in * k_out / (c_in * c_out)
        lines.append(f"| {'depthwise ' if dw else ''}{k}x{k} conv at {hw}x{hw} | {c_in} -> {k_in} | {flops:.2f} | "
                     f"{td:.3f} -> {tp:.3f} | {tp / td:.2f} | {cd:.3f} -> {cp:.3f} | {cp / cd:.2f} | "
                     f"{bd:.3f} -> {bp:.3f} |")
    return lines


def compiled(model: nn.Module, how: str, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if how == "channels_last":
        return model.to(memory_format=CL)
    if how == "fx fuse":
        from torch.fx.experimental.optimization import fuse
        return fuse(model)
    if how == "jit optimize_for_inference":
        with torch.no_grad():
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
    return model


def model_lines() -> list[str]:
    lines = ["| model | eager | channels_last | fx fuse (BatchNorm folded) | jit optimize_for_inference |",
             "|---|---:|---:|---:|---:|"]
    x = torch.randn(64, 1, 28, 28)
    for name in vc.MODELS:
        dense = trained(name).eval()
        pruned = copy.deepcopy(dense)
        pk.prune_channels(pruned, vc.calibration(0, 256), flops=0.5, score="l2", refine=None, recalibrate_bn=False)
        cells = []
        for how in ("eager", "channels_last", "fx fuse", "jit optimize_for_inference"):
            try:
                d, p = compiled(dense, how, x), compiled(pruned, how, x)
                td, tp = alternated(d, x, p, x, repeats=30)
                cells.append(f"x{td / tp:.2f} ({td:.1f} / {tp:.1f} ms)")
            except Exception as e:  # noqa: BLE001 - a treatment that cannot take the model is reported
                cells.append(f"fails: {type(e).__name__}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def pruned_to(dense: nn.Module, graph, kept: list[int], calib: list[torch.Tensor] | None) -> nn.Module:
    """A copy of ``dense`` keeping ``kept[g]`` channels of group ``g`` (the lowest-l2 ones go); with
    ``calib``, refit by least squares and BatchNorm re-estimated, as ``prune_channels`` would."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        removed = {g: lowest(channel_scores(model, grp, "l2", {}), grp.count - k)
                   for g, (grp, k) in enumerate(zip(graph.groups, kept)) if grp.count > k}
        undo = Undo()
        if calib is not None:
            repair(model, graph, removed, collect_batches(calib, None), 0.01, undo, {})
        shrink_channels(model, graph, removed, undo)
        if calib is not None:
            pk.recalibrate_batchnorm(model, calib)
    return model


def allocation_lines(name: str, trials: int = 400, timed: int = 40, top: int = 3) -> list[str]:
    dense = trained(name).eval()
    calib = vc.calibration(0, 256)
    graph = find_channel_groups(dense, calib[0])
    counts = [grp.count for grp in graph.groups]
    uniform = [grp.count - n for grp, n in zip(graph.groups, flops_counts(graph, 0.5))]
    gen = torch.Generator().manual_seed(0)
    found: list[tuple[list[int], float]] = []
    for _ in range(trials):
        keep = [max(1, round(c * (1 + int(torch.randint(1, 8, (1,), generator=gen))) / 8)) for c in counts]
        removed = 1 - macs(graph, [c - k for c, k in zip(counts, keep)]) / macs(graph)
        if 0.5 <= removed <= 0.56 and len(found) < timed:
            found.append((keep, removed))
    x = torch.randn(64, 1, 28, 28)
    timed_rows = []
    for keep, removed in found:
        d_ms, p_ms = alternated(dense, x, pruned_to(dense, graph, keep, None), x, repeats=15)
        timed_rows.append((d_ms / p_ms, removed, keep))
    timed_rows.sort(key=lambda r: -r[0])
    lines = [f"{TITLES.get(name, name)} groups and channels: {', '.join(f'{g.name} {g.count}' for g in graph.groups)}. {len(found)} random "
             f"allocations removing 50-56% of the FLOPs timed (batch 64, 15 alternated repeats); the uniform one and the "
             f"{top} fastest, pruned for real (one shot, l2 + least squares + BatchNorm re-estimated, 2,000 test images):",
             "", "| allocation (channels kept per group) | FLOPs removed | b64 speed-up | one-shot accuracy % |",
             "|---|---:|---:|---:|"]
    for label, keep in [("uniform (`flops=0.5`)", uniform)] + [(None, r[2]) for r in timed_rows[:top]]:
        model = pruned_to(dense, graph, keep, calib)
        d_ms, p_ms = alternated(dense, x, model, x, repeats=30)
        removed = 1 - macs(graph, [c - k for c, k in zip(counts, keep)]) / macs(graph)
        lines.append(f"| {label or keep} | {100 * removed:.1f}% | x{d_ms / p_ms:.2f} | "
                     f"{vc.test_accuracy(model, 2000):.2f} |")
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
             "## Other allocations of the ResNet's FLOPs", "", *allocation_lines("resnet"), "",
             "## Other allocations of the MobileNet's FLOPs", "", *allocation_lines("mobilenet"), "",
             f"Load average at the end: {os.getloadavg()[0]:.2f}."]
    out = os.path.join(HERE, "results", "vision_speed_why.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
