"""What SNOWS refinement costs on a real-size CNN, and where the time goes (``make bench-snows-cost``).

The network is a MobileNetV2-style depthwise-separable CNN (Sandler et al. 2018) at width 1.2:
4.7M parameters, 52 convolutions of which 17 depthwise, 224x224 inputs, random weights (cost
does not depend on training; BatchNorm statistics are set once on the calibration images so
activations have realistic scales). 128 calibration images, magnitude support at 50%, then
``refine="snows"``. The classifier head stays dense (prunekit's default).

``--profile`` wraps the solver's pieces in timers (the library itself carries no timing code):
lookahead forwards with a graph (the Newton loss), without (dense targets, line search trials),
the gradient (first backward, graph kept), HVPs (double backward, or with ``"hvp": "gauss_newton"``
a JVP forward and one backward), the rest of CG, the line search,
statistics gathering and block input capture. Per-layer times are grouped by layer kind (stem,
depthwise, pointwise, linear). ``--layers`` limits the run to some layers (a regex, for a quick
extrapolation); ``--options`` passes ``refine_options`` as JSON, e.g.
``'{"per_group": true, "hessian_fraction": 1.0}'`` for the settings before this benchmark.

Writes ``benchmarks/results/snows_cost.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import prunekit as pk
from prunekit.oneshot import blocks as pk_blocks
from prunekit.oneshot import lookahead as snows
from prunekit.oneshot.solvers import newton_cg
from prunekit.oneshot import pipeline as pk_pipeline
from prunekit.oneshot.methods import snows as snows_method

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# -- the network --------------------------------------------------------------------------------

def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True,
         act_layer: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act_layer()] if act else []))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 projection; a residual sum when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(*([_cbr(cin, hidden)] if expand != 1 else []),
                                  _cbr(hidden, hidden, 3, stride, groups=hidden), _cbr(hidden, cout, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


def mobilenet(width: float = 1.2, classes: int = 1000) -> nn.Sequential:
    """MobileNetV2-style network as an ``nn.Sequential`` of blocks (stem, 17 inverted residuals,
    last 1x1 conv, head): prunekit calibrates block by block."""
    def c(v: float) -> int:
        return max(8, int(v * width + 4) // 8 * 8)
    stages = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [_cbr(3, c(32), 3, 2)]
    cin = c(32)
    for expand, cout, repeats, stride in stages:
        for i in range(repeats):
            layers.append(InvertedResidual(cin, c(cout), stride if i == 0 else 1, expand))
            cin = c(cout)
    last = max(1280, c(1280))
    layers += [_cbr(cin, last), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes))]
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: 1x1 reduce, SiLU, 1x1 expand, sigmoid (Hu et al. 2018)."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce, self.act = nn.Conv2d(channels, squeezed, 1), nn.SiLU()
        self.expand, self.gate = nn.Conv2d(squeezed, channels, 1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expansion, kxk depthwise, squeeze-excitation (a quarter of the
    block's input channels), 1x1 projection; SiLU; a residual sum when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = _cbr(cin, hidden, act_layer=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = _cbr(hidden, hidden, kernel, stride, groups=hidden, act_layer=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = _cbr(hidden, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


def efficientnet(classes: int = 1000) -> nn.Sequential:
    """EfficientNet-B0's layout (Tan & Le 2019): 3x3 stem, 16 MBConv blocks with 3x3 and 5x5
    depthwise convolutions and squeeze-excitation, 1x1 head conv to 1280, classifier; 5.3M
    parameters, 81 convolutions (16 depthwise, 32 in the squeeze-excitations)."""
    stages = [(1, 3, 16, 1, 1), (6, 3, 24, 2, 2), (6, 5, 40, 2, 2), (6, 3, 80, 3, 2), (6, 5, 112, 3, 1),
              (6, 5, 192, 4, 2), (6, 3, 320, 1, 1)]
    layers: list[nn.Module] = [_cbr(3, 32, 3, 2, act_layer=nn.SiLU)]
    cin = 32
    for expand, kernel, cout, repeats, stride in stages:
        for i in range(repeats):
            layers.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    layers += [_cbr(cin, 1280, act_layer=nn.SiLU), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes))]
    return nn.Sequential(*layers)


NETS = {"mobilenet": mobilenet, "efficientnet": efficientnet}


def layer_kind(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if ".se." in name:
        return "squeeze-excitation"
    if module.groups > 1:
        return f"depthwise {module.kernel_size[0]}x{module.kernel_size[1]}"
    return "stem" if module.in_channels == 3 else "pointwise" if module.kernel_size == (1, 1) else "conv"


# -- timers (installed only with --profile) ------------------------------------------------------

class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.undo: list = []
        self.per_layer: list[dict] = []
        self.names: dict[int, str] = {}

    @contextlib.contextmanager
    def time(self, key: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - t0
            self.cpu[key] += time.process_time() - c0
            self.calls[key] += 1

    def wrap(self, owner, attr: str, key) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.time(key() if callable(key) else key):
                return original(*args, **kwargs)
        setattr(owner, attr, timed)
        self.undo.append((owner, attr, original))

    def install(self) -> None:
        self.wrap(snows.Lookahead, "tensors",
                  lambda: "lookahead forward (JVP, inside the HVP)" if fwAD._current_level >= 0 else
                  "lookahead forward (graph)" if torch.is_grad_enabled() else "lookahead forward (no grad)")
        self.wrap(newton_cg.MaskedHVP, "__init__", "gradient (backward, graph kept)")
        self.wrap(newton_cg.MaskedHVP, "__call__", "HVP (double backward)")
        self.wrap(newton_cg.GaussNewtonHVP, "__call__", "HVP (Gauss-Newton: JVP + backward)")
        self.wrap(newton_cg, "conjugate_gradient", "CG (incl. HVPs)")
        self.wrap(newton_cg, "_armijo", "line search (incl. its forwards)")
        self.wrap(snows_method, "snows_refit", "snows_refit total")
        original = snows_method.snows_refit  # per-layer log line

        def logged(model, chain, layer, *args, **kwargs):
            t0, c0, before = time.perf_counter(), time.process_time(), dict(self.calls)
            out = original(model, chain, layer, *args, **kwargs)
            counts = {k: self.calls[k] - before.get(k, 0) for k in self.calls if self.calls[k] != before.get(k, 0)}
            self.per_layer.append({"layer": self.names.get(id(layer), "?"), "wall": time.perf_counter() - t0,
                                   "cpu": time.process_time() - c0, "calls": counts,
                                   "before": out[1], "after": out[2]})
            print(json.dumps(self.per_layer[-1]), flush=True)
            return out
        snows_method.snows_refit = logged
        self.undo.append((snows_method, "snows_refit", original))
        self.wrap(pk_pipeline, "gather_stats", "statistics (H, C per stage)")
        self.wrap(pk_pipeline, "capture_inputs", "block input capture")
        self.wrap(pk_pipeline, "propagate", "block propagate")
        self.wrap(pk_blocks, "propagate", "block propagate")

    def remove(self) -> None:
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)


# -- the run -------------------------------------------------------------------------------------

def calibration(n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images (low-frequency noise upsampled), normalised like ImageNet inputs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 14, 14, generator=g)
    x = nn.functional.interpolate(low, size=224, mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, 224, 224, generator=g)
    return list(x.split(batch))


def build(seed: int, calib: list[torch.Tensor], net: str = "mobilenet") -> nn.Sequential:
    torch.manual_seed(seed)
    model = NETS[net]()
    model.train()
    with torch.no_grad():  # BatchNorm statistics from the calibration images (cumulative average)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for x in calib:
            model(x)
    return model.eval()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    calib = calibration(args.images, args.batch)
    model = build(0, calib, args.net)
    modules = dict(model.named_modules())
    options = json.loads(args.options) if args.options else {}
    timers = Timers()
    timers.names = {id(m): n for n, m in modules.items()}
    if args.profile:
        timers.install()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = pk.prune(model, calib, sparsity=args.sparsity, method="magnitude", refine="snows",
                          refine_options=options, include=args.layers, progress=False)
    finally:
        timers.remove()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_kind: dict[str, dict[str, float]] = defaultdict(lambda: {"layers": 0, "units": 0, "seconds": 0.0})
    layers = []
    for rep in result.layers:
        module_name = re.sub(r"\.weight\[g\d+\]$", "", rep.name)
        kind = layer_kind(module_name, modules[module_name])
        row = per_kind[kind]
        row["units"] += 1
        row["seconds"] += rep.seconds
        if rep.lookahead_after is not None:
            layers.append({"name": module_name, "kind": kind, "seconds": None,
                           "before": rep.lookahead_before, "after": rep.lookahead_after})
    for rep in result.layers:  # seconds per module (a depthwise conv's groups summed)
        module_name = re.sub(r"\.weight\[g\d+\]$", "", rep.name)
        for row in layers:
            if row["name"] == module_name:
                row["seconds"] = (row["seconds"] or 0.0) + rep.seconds
    for kind in per_kind:
        per_kind[kind]["layers"] = len({row["name"] for row in layers if row["kind"] == kind})
    return {"total_seconds": total, "total_cpu_seconds": cpu, "per_kind": dict(per_kind), "layers": layers,
            "phases": dict(timers.seconds), "phase_cpu": dict(timers.cpu), "phase_calls": dict(timers.calls), "per_layer": timers.per_layer, "options": options,
            "sparsity_prunable": result.sparsity if hasattr(result, "sparsity") else None}


def _command(config: dict) -> str:
    """The command line rebuilt from a JSON's recorded arguments (for runs that did not store it)."""
    flags = {"images": 128, "batch": 16, "sparsity": 0.5, "layers": None, "options": None, "net": "mobilenet"}
    parts = [f"--{k} {json.dumps(v) if k == 'options' else repr(v) if k == 'layers' else v}"
             for k, v in config.items() if k in flags and v != flags[k]]
    return "OMP_NUM_THREADS={} python benchmarks/snows_cost.py {}{}".format(
        config.get("threads", 2), " ".join(parts), " --profile" if config.get("profile") else "")


def write_md(out: dict, path: str) -> None:
    """A summary of one run: per layer kind (wall and CPU seconds of the refits, per layer), per
    phase, per layer; with the command and the load average (an older JSON may lack them)."""
    machine, config = out.get("machine", {}), out.get("config", {})
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: {"layers": 0, "wall": 0.0, "cpu": 0.0})
    names = {row["name"]: row["kind"] for row in out.get("layers", [])}
    for row in out.get("per_layer", []):
        k = kinds[names.get(re.sub(r"\.weight\[g\d+\]$", "", row["layer"]), row["layer"])]
        k["layers"] += 1
        k["wall"] += row["wall"]
        k["cpu"] += row["cpu"]
    lines = [f"# SNOWS cost: `{config.get('net', 'mobilenet')}`, {config.get('images')} images", "",
             f"`{out.get('command') or _command(config)}`", "",
             f"torch {machine.get('torch')}, {machine.get('threads')} threads; load average (1 min) "
             f"{machine.get('load_before', float('nan')):.2f} before, {machine.get('load_after', float('nan')):.2f} after. "
             f"prune() wall {out['total_seconds']:.1f} s, CPU {out['total_cpu_seconds']:.1f} s.", "",
             "| layer kind | refits | wall s | CPU s | wall s per refit |", "|---|---:|---:|---:|---:|"]
    for kind, k in sorted(kinds.items()):
        lines.append(f"| {kind} | {k['layers']} | {k['wall']:.1f} | {k['cpu']:.1f} | {k['wall'] / k['layers']:.1f} |")
    lines += ["", "| phase | calls | wall s | CPU s |", "|---|---:|---:|---:|"]
    for phase, sec in out.get("phases", {}).items():
        lines.append(f"| {phase} | {out['phase_calls'][phase]} | {sec:.1f} | {out['phase_cpu'][phase]:.1f} |")
    lines += ["", "| layer | wall s | CPU s | HVPs | lookahead loss before -> after |", "|---|---:|---:|---:|---|"]
    for row in out.get("per_layer", []):
        hvps = sum(v for key, v in row["calls"].items() if key.startswith("HVP"))
        lines.append(f"| `{row['layer']}` | {row['wall']:.1f} | {row['cpu']:.1f} | {hvps} | "
                     f"{row['before']:.4g} -> {row['after']:.4g} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=sorted(NETS), default="mobilenet",
                    help="mobilenet (3x3 depthwise, ReLU6) or efficientnet (B0: 3x3 and 5x5 depthwise, SE, SiLU)")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--layers", default=None, help="include= regex (default: every prunable layer)")
    ap.add_argument("--options", default=None, help="refine_options as JSON")
    ap.add_argument("--profile", action="store_true", help="time the solver's phases")
    ap.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    ap.add_argument("--md-from", default=None, help="only write the .md summary of this saved .json")
    args = ap.parse_args()
    if args.md_from:
        with open(args.md_from) as fh:
            return write_md(json.load(fh), args.md_from[: -len(".json")] + ".md")
    load = os.getloadavg()
    out = run(args)
    out["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "md_from")}
    out["command"] = "OMP_NUM_THREADS={} python {}".format(args.threads, " ".join(["benchmarks/snows_cost.py"] + sys.argv[1:]))
    out["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor(),
                      "threads": args.threads, "load_before": load[0], "load_before_5min": load[1],
                      "load_after": os.getloadavg()[0]}
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        if args.out.endswith(".json"):
            write_md(out, args.out[: -len(".json")] + ".md")
    print(json.dumps({k: out[k] for k in ("total_seconds", "total_cpu_seconds", "per_kind", "phases", "phase_cpu", "phase_calls")}, indent=1))


if __name__ == "__main__":
    main()
