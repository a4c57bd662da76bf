"""The refit's ridge against the fine-tune that follows (``python benchmarks/vision_damp_finetune.py``).

After the shared lr 0.01 fine-tune prunekit's refit models lose more than torch-pruning's broken
ones gain (``structured_vision_peer.md``). This measures one suspect: the least-squares refit's
ridge ``damp`` (pulling the kept columns towards their dense values). For each zoo model,
``pk.prune_channels(model, calib, flops=0.5, score="obs", budget="global", damp=d)`` (512
calibration images, seed 0, BatchNorm re-estimated), then both shared fine-tunes of
``_vision_common`` on copies; accuracy on 5,000 *held-out training images* (positions
40,000-44,999 of the fine-tune's own permutation, never in its batches), so that no choice made
from this table touches the test images. One calibration seed and one fine-tune each: differences
under about 0.5 points are noise. Writes ``benchmarks/results/vision_damp_finetune.md``.
"""
from __future__ import annotations

import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _vision_common as vc  # noqa: E402
import prunekit as pk  # noqa: E402
from structured_vision import has_bn, trained  # noqa: E402

DAMPS = (0.01, 0.1, 0.3, 1.0, 3.0)


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """Training images 40,000-44,999 of the fine-tune's permutation (it uses the first 2,560)."""
    x, y = vc.mnist("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(vc.FINETUNE.seed))[40000:45000]
    return x[order], y[order]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    torch.manual_seed(0)
    x, y = held_out()
    load = os.getloadavg()
    lines = ["# The refit's ridge against the short fine-tune that follows", "",
             f"`python benchmarks/vision_damp_finetune.py` (torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"load average {load[0]:.2f} at the start). {__doc__.split(chr(10), 2)[2].split('Writes')[0].strip()}", "",
             "| model | damp | held-out accuracy %: one shot | after lr 0.01 | after lr 0.001 |", "|---|---:|---:|---:|---:|"]
    for name in ("resnet", "mobilenet", "vit"):
        dense = trained(name).eval()
        calib = vc.calibration(0, 512)
        lines.append(f"| {name} | dense | {accuracy(dense, x, y):.2f} | "
                     f"{accuracy(vc.fine_tune(copy.deepcopy(dense), vc.FINETUNE), x, y):.2f} | "
                     f"{accuracy(vc.fine_tune(copy.deepcopy(dense), vc.GENTLE), x, y):.2f} |")
        for damp in DAMPS:
            model = copy.deepcopy(dense)
            pk.prune_channels(model, calib, flops=0.5, score="obs", budget="global", damp=damp,
                              recalibrate_bn=has_bn(model))
            cells = [accuracy(model, x, y)] + [accuracy(vc.fine_tune(copy.deepcopy(model), r), x, y)
                                               for r in (vc.FINETUNE, vc.GENTLE)]
            lines.append(f"| {name} | {damp:g} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.2f}."]
    with open(os.path.join(HERE, "results", "vision_damp_finetune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
