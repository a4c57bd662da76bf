"""What SNOWS's least-squares warm start costs against its Newton steps on a large convolution
(issue 20 item 6).

A resnet18d-style network (deep stem, BasicBlocks [2, 2, 2, 2], average-pool shortcuts; random
weights, BatchNorm statistics set on the calibration images) at 32x32 with 4 images (one batch
by default), magnitude support at 50% on ONE 512->512 3x3 convolution (4608 input columns,
``--layer``), then ``refine="snows"`` with its defaults. In one process, ``--repeats`` times on
fresh copies of the model: the warm start (``lstsq_warm_start``: CG on this layer) and the Newton
steps (``snows_refit``) are timed; medians and their ratio are reported. The exact per-row solve
(``lstsq_refit``, the warm start before) is timed on the same statistics once (``--exact``), and
the layer-wise objective of the masked start, the CG warm start and the exact one is compared.

Writes ``benchmarks/results/snows_warm_start.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.methods import snows as snows_method
from prunekit.oneshot.solvers.lstsq import lstsq_refit
from prunekit.oneshot.solvers import lstsq_cg

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _cbr(cin: int, cout: int, stride: int = 1, act: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), *([nn.ReLU()] if act else [])]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the 'd' shortcut: average pool, then a 1x1 convolution."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = _cbr(cin, cout, stride)
        self.conv2, self.bn2 = _cbr(cout, cout, act=False)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                                      if stride > 1 else nn.Identity(),
                                      nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + (x if self.down is None else self.down(x)))


def resnet18d(classes: int = 1000) -> nn.Sequential:
    """resnet18d's layout (He et al. 2019, 'bag of tricks' variant D) as an ``nn.Sequential``."""
    stem = nn.Sequential(*_cbr(3, 32, 2), *_cbr(32, 32), *_cbr(32, 64), nn.MaxPool2d(3, 2, 1))
    layers: list[nn.Module] = [stem]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)))
    return nn.Sequential(*layers)


def build(images: int, size: int, batch: int, seed: int = 0) -> tuple[nn.Sequential, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    calib = list(torch.randn(images, 3, size, size, generator=g).split(batch))
    torch.manual_seed(seed)
    model = resnet18d().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for x in calib:
            model(x)
    return model.eval(), calib


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    base, calib = build(args.images, args.size, args.batch)
    timed: dict[str, list[float]] = {"warm start": [], "Newton steps": []}
    captured: list[tuple] = []
    warm, refit = snows_method.lstsq_warm_start, snows_method.snows_refit

    def timed_warm(weight, mask, hessian, cross=None, **kw):
        t0 = time.perf_counter()
        out = warm(weight, mask, hessian, cross, **kw)
        timed["warm start"].append(time.perf_counter() - t0)
        if not captured:
            captured.append((weight.detach().clone(), mask.clone(), hessian.clone(),
                             None if cross is None else cross.clone(), kw))
        return out

    def timed_refit(*a, **kw):
        t0 = time.perf_counter()
        out = refit(*a, **kw)
        timed["Newton steps"].append(time.perf_counter() - t0)
        return out

    snows_method.lstsq_warm_start, snows_method.snows_refit = timed_warm, timed_refit
    steps = []
    try:
        for _ in range(args.repeats):
            result = pk.prune(copy.deepcopy(base), calib, sparsity=0.5, method="magnitude", refine="snows",
                              include=f"^{args.layer}$", progress=False)
            steps.append([r.lookahead_before for r in result.layers] + [r.lookahead_after for r in result.layers])
    finally:
        snows_method.lstsq_warm_start, snows_method.snows_refit = warm, refit
    weight, mask, hessian, cross, kw = captured[0]
    out = {"layer": args.layer, "shape": list(weight.shape), "kept": int(mask.sum()),
           "warm_start_s": timed["warm start"], "newton_s": timed["Newton steps"],
           "median_warm_start_s": statistics.median(timed["warm start"]),
           "median_newton_s": statistics.median(timed["Newton steps"]),
           "lookahead_before_after": steps[0],
           "solver": "exact" if lstsq_cg.uses_exact(mask) else "cg"}
    out["ratio"] = out["median_warm_start_s"] / out["median_newton_s"]
    err = {"masked start": weight * mask, "CG warm start": lstsq_cg.lstsq_cg(weight, mask, hessian, cross, **kw)}
    if args.exact:
        t0 = time.perf_counter()
        err["exact least squares"] = lstsq_refit(weight, mask, hessian, cross, **kw)
        out["exact_s"] = time.perf_counter() - t0
        out["exact_ratio"] = out["exact_s"] / out["median_newton_s"]
    out["objective"] = {k: objective(w, weight, hessian, cross) for k, w in err.items()}
    return out


def objective(w: torch.Tensor, w0: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor | None) -> float:
    """The layer-wise objective less its constant: ``[tr(W H W^T) - 2 tr(W C W0^T)] / d_out``
    (float64; differences between weights are differences of ``mean((X_s W^T - X_t W0^T)^2)``)."""
    w, w0, h = w.double(), w0.double(), hessian.double()
    c = h if cross is None else cross.double()
    return float(((w @ h) * w).sum() - 2 * ((w @ c) * w0).sum()) / w.shape[0]


def write_md(out: dict, path: str) -> None:
    obj = out["objective"]
    rows = "\n".join(f"| {k} | {v:.9g} |" for k, v in obj.items())
    if "exact least squares" in obj:
        gap = (obj["CG warm start"] - obj["exact least squares"]) / (obj["masked start"] - obj["exact least squares"])
        rows += (f"\n\nThe CG warm start is {gap:.1e} of the way from the exact solution back to the masked start "
                 "(0: exact, 1: no better than the start).")
    exact = (f"| exact per-row least squares (before), once | {out['exact_s']:.1f} | "
             f"{out['exact_ratio']:.1f}x |\n") if "exact_s" in out else ""
    text = f"""# SNOWS warm start against its Newton steps (issue 20 item 6)

`{out['command']}`

resnet18d-style network at {out['config']['size']} px, {out['config']['images']} images in batches of
{out['config']['batch']}, magnitude 50% on `{out['layer']}` ({out['shape'][0]}x{out['shape'][1]}, {out['kept']} kept),
SNOWS defaults; {out['machine']['threads']} threads, torch {out['machine']['torch']}, load average
{out['machine']['load_before']:.2f} before / {out['machine']['load_after']:.2f} after (1-minute).
Medians of {out['config']['repeats']} runs in one process (so both phases ran under the same load; on a
shared machine the seconds are inflated, the ratio much less); the warm start used: **{out['solver']}**
(`lstsq_warm_start` picks CG for this layer: `uses_exact` is false).

| phase | seconds (median) | x Newton steps |
|---|---:|---:|
| warm start (`lstsq_warm_start`) | {out['median_warm_start_s']:.2f} | **{out['ratio']:.2f}x** |
| Newton steps (`snows_refit`) | {out['median_newton_s']:.2f} | 1 |
{exact}
All runs: warm start {', '.join(f'{s:.2f}' for s in out['warm_start_s'])} s; Newton steps
{', '.join(f'{s:.2f}' for s in out['newton_s'])} s.

Layer-wise objective `mean((X_s W'^T - X_t W0^T)^2)` less its constant term (lower is better;
from the layer's statistics, no ridge):

| weights | objective |
|---|---:|
{rows}
"""
    with open(path, "w") as fh:
        fh.write(text)


def _rewrite_md(json_path: str) -> None:
    """Regenerate the .md from a saved .json (``--md-from``)."""
    with open(json_path) as fh:
        write_md(json.load(fh), json_path[: -len(".json")] + ".md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default=r"7\.conv2", help="the 512->512 3x3 convolution (module name regex)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the exact per-row solve once (about 2 minutes on 2 cores)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "snows_warm_start"), help="path without extension")
    ap.add_argument("--md-from", default=None, help="only rewrite the .md of this saved .json")
    args = ap.parse_args()
    if args.md_from:
        return _rewrite_md(args.md_from)
    load = os.getloadavg()[0]
    out = run(args)
    out["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    out["command"] = "OMP_NUM_THREADS={} python {}".format(args.threads, " ".join(["benchmarks/snows_warm_start.py"] + sys.argv[1:]))
    out["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor(),
                      "threads": args.threads, "load_before": load, "load_after": os.getloadavg()[0]}
    if args.out:
        with open(args.out + ".json", "w") as fh:
            json.dump(out, fh, indent=1)
        write_md(out, args.out + ".md")
    print(json.dumps({k: v for k, v in out.items() if k not in ("config",)}, indent=1))


if __name__ == "__main__":
    main()
