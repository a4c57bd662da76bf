"""CPU speed of the channel-pruned zoo models against the dense ones (``make bench-structured-vision-speed``).

For each model of ``_vision_common.MODELS``, each FLOPs target and each set-up of ``--setups``
(``SETUPS``: ``l2`` = ``score="l2"`` with one uniform ratio, ``obs-global`` = ``score="obs"``
with ``budget="global"``, ``obs-latency`` = the same ranked per millisecond by a table from
``pk.measure_channel_latency`` on a batch of 64 (measured once per model in a run, its time in
``table_s``), ``obs-speedup`` = that ranking only until the table predicts x1.5 (``speedup=1.5``),
then by score until the FLOPs target, ``sens-global`` / ``sens-speedup`` = ``obs-global`` /
``obs-speedup`` with groups ranked by the output error measured by ``pk.measure_channel_sensitivity``
(score obs, least squares, the calibration images; once per model, its time in ``sensitivity_s``)
instead of normalised scores), ``sens-measured`` = ``sens-speedup`` through
``pk.prune_channels_to_speedup`` (the goal raised by each measured shortfall on a batch of 64, up to
3 prunes of copies), ``pk.prune_channels(model, calib, flops=f, refine="lstsq",
multiple_of=m, **setup)`` for every ``m`` of ``--multiples`` (1: the channel counts the budget
gives, e.g. 5, 11, 22; 8: every group keeps a multiple of 8 channels, which vectorised conv
kernels favour). The pruned model's forward latency is then
measured against the dense model's in this process, alternated repeat by repeat on the same input
(``_vision_common.latency``: no autograd, ``--threads`` intra-op threads), at batch 1 and 64, in
``--rounds`` rounds; reported: the median over rounds of each round's median ratio. Latency depends
only on the shapes, but the rounded shapes change accuracy too, so each row also carries the pruned
model's one-shot test accuracy (BatchNorm re-estimated on the calibration images) and its accuracy
after the shared short fine-tune (``_vision_common.FINETUNE`` and ``GENTLE``), calibration seed 0.

Writes ``benchmarks/results/structured_vision_speed.json`` and ``.md`` with the issue's goal (at 50%
of the FLOPs removed, >= 1.5x dense at batch 64) marked met or missed per model and width rule.
Run it on a quiet machine: the timings are only as good as the machine is idle.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _vision_common as vc  # noqa: E402
import prunekit as pk  # noqa: E402
from structured_vision import has_bn, trained  # noqa: E402

OUT = os.path.join(HERE, "results", "structured_vision_speed")
GOAL_SPEEDUP, GOAL_FLOPS = 1.5, 0.5
RECIPES = [vc.FINETUNE, vc.GENTLE]
SETUPS = {"l2": {"score": "l2"}, "obs-global": {"score": "obs", "budget": "global"},
          "obs-latency": {"score": "obs", "budget": "global", "latency": "measured"},
          "obs-speedup": {"score": "obs", "budget": "global", "latency": "measured", "speedup": GOAL_SPEEDUP},
          "sens-global": {"score": "obs", "budget": "global", "sensitivity": "measured"},
          "sens-speedup": {"score": "obs", "budget": "global", "sensitivity": "measured", "latency": "measured",
                           "speedup": GOAL_SPEEDUP},
          "sens-measured": {"score": "obs", "sensitivity": "measured", "latency": "measured", "speedup": GOAL_SPEEDUP,
                            "to_speedup": True}}


def measure(dense, pruned, batch: int, repeats: int, rounds: int, threads: int) -> dict:
    """Median over ``rounds`` of each round's alternated medians (dense ms, pruned ms, ratio)."""
    runs = [vc.latency(dense, pruned, batch, repeats, threads=threads) for _ in range(rounds)]
    return {"dense_ms": statistics.median(r.dense_ms for r in runs),
            "pruned_ms": statistics.median(r.pruned_ms for r in runs),
            "speedup": statistics.median(r.speedup for r in runs),
            "speedups": [round(r.speedup, 3) for r in runs], "repeats": repeats, "rounds": rounds}


def latency_table(dense, args, tables: dict) -> tuple[pk.ChannelLatency, float]:
    """The model's ``pk.measure_channel_latency`` table on a batch of 64, measured on first use in
    this run (``tables`` keeps it by kind and model) and the seconds that took."""
    key = ("latency", id(dense))
    if key not in tables:
        start = time.perf_counter()
        table = pk.measure_channel_latency(dense, torch.randn(64, 1, 28, 28), threads=args.threads)
        tables[key] = (table, time.perf_counter() - start)
    return tables[key]


def sensitivity_table(dense, calib, tables: dict) -> tuple[pk.ChannelSensitivity, float]:
    """The model's ``pk.measure_channel_sensitivity`` table (score obs) on the calibration images,
    measured on first use in this run, and the seconds that took."""
    key = ("sensitivity", id(dense))
    if key not in tables:
        start = time.perf_counter()
        table = pk.measure_channel_sensitivity(dense, calib, score="obs")
        tables[key] = (table, time.perf_counter() - start)
    return tables[key]


def row(name: str, dense, calib, flops: float, setup: str, multiple_of: int, args, tables: dict) -> dict:
    model = copy.deepcopy(dense)
    kwargs = dict(SETUPS[setup])
    table_s = sensitivity_s = None
    if kwargs.get("latency") == "measured":
        kwargs["latency"], table_s = latency_table(dense, args, tables)
    if kwargs.get("sensitivity") == "measured":
        kwargs["sensitivity"], sensitivity_s = sensitivity_table(dense, calib, tables)
    start = time.perf_counter()
    out = {"model": name, "target": flops, "setup": setup, "multiple_of": multiple_of}
    try:
        if kwargs.pop("to_speedup", False):
            result = pk.prune_channels_to_speedup(model, calib, torch.randn(64, 1, 28, 28), threads=args.threads,
                                                  flops=flops, refine="lstsq", multiple_of=multiple_of,
                                                  recalibrate_bn=has_bn(model), **kwargs)
        else:
            result = pk.prune_channels(model, calib, flops=flops, refine="lstsq", multiple_of=multiple_of,
                                       recalibrate_bn=has_bn(model), **kwargs)
    except ValueError as e:  # a speed target the table says cannot be reached (or never measured): recorded
        if "speedup" not in kwargs:
            raise
        return {**out, "refused": str(e), "table_s": table_s, "sensitivity_s": sensitivity_s}
    out = {**out,
           "prune_s": time.perf_counter() - start, "table_s": table_s, "sensitivity_s": sensitivity_s,
           "predicted_speedup": result.predicted_speedup,
           "measured_in_prune": result.measured_speedup,
           "flops_removed": result.flops_removed, "params": result.params_after,
           "channels": {r.owner: [r.units_before, r.units_after] for r in result.reports},
           "accuracy": vc.test_accuracy(model, args.test)}
    for recipe in RECIPES:
        out[f"accuracy_ft_{recipe.label}"] = vc.test_accuracy(vc.fine_tune(copy.deepcopy(model), recipe), args.test)
    load = os.getloadavg()
    out["b1"] = measure(dense, model, 1, 5 * args.repeats, args.rounds, args.threads)
    out["b64"] = measure(dense, model, 64, args.repeats, args.rounds, args.threads)
    out["load"] = [load, os.getloadavg()]
    return out


def predicted(r: dict) -> str:
    """The b64 speed-up the latency table predicted for a latency-ranked row ('' for the others)."""
    return f"x{r['predicted_speedup']:.2f}" if r.get("predicted_speedup") else ""


def write_md(state: dict, out: str) -> None:
    meta = state["meta"]
    lines = [
        "# CPU speed of channel-pruned MNIST models against the dense ones",
        "",
        f"Commands: " + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", meta["command"]) for r in state["rows"]))
        + f" (the last started {meta['started']}, load average {meta['load_start'][0]:.2f} at its start; each row's "
        f"load is in the table; torch {meta['torch']}; {meta['threads']} intra-op thread(s) while timing). A run "
        "with `--models` / `--setups` / `--flops` / `--multiples` replaces those rows and keeps the others.",
        "",
        "`pk.prune_channels(model, calib, flops=f, refine='lstsq', multiple_of=m, **setup)` (set-ups: "
        + "; ".join(f"`{k}`: {v}" for k, v in SETUPS.items()) + ") on "
        f"{meta['calibration']} training images (calibration seed 0), BatchNorm re-estimated. Latency: forward "
        "of one random input, dense and pruned alternated in this process, no autograd; "
        f"{5 * meta['repeats']} repeats at batch 1 and {meta['repeats']} at batch 64 per round, {meta['rounds']} "
        "rounds; speed-up = median over rounds of dense / pruned (> 1: faster), with each round's ratio listed. "
        "Accuracy: top-1 % on the first "
        f"{meta['test']} MNIST test images, one shot and after each short fine-tune "
        f"({'; '.join(r.describe() for r in RECIPES)}).",
        "",
        "| model | target | set-up | multiple_of | FLOPs removed | kept channels | one shot % | fine-tuned % (lr 0.01 / 0.001) "
        "| b1 dense / pruned ms | b1 speed-up | b64 dense / pruned ms | b64 speed-up | b64 rounds | table predicts | load |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in state["rows"]:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['target']:.0%} | {r['setup']} | {r['multiple_of']} | refused: "
                         f"{r['refused']} |" + " |" * 10)
            continue
        kept = ", ".join(str(v[1]) for v in r["channels"].values())
        fts = " / ".join(f"{r[f'accuracy_ft_{x.label}']:.2f}" for x in RECIPES)
        lines.append(f"| {r['model']} | {r['target']:.0%} | {r.get('setup', 'l2')} | {r['multiple_of']} | {100 * r['flops_removed']:.1f}% | "
                     f"{kept} | {r['accuracy']:.2f} | {fts} | {r['b1']['dense_ms']:.2f} / {r['b1']['pruned_ms']:.2f} | "
                     f"x{r['b1']['speedup']:.2f} | {r['b64']['dense_ms']:.1f} / {r['b64']['pruned_ms']:.1f} | "
                     f"**x{r['b64']['speedup']:.2f}** | {', '.join(f'{s:.2f}' for s in r['b64']['speedups'])} | "
                     f"{predicted(r)} | {r['load'][0][0]:.2f} |")
    lines += ["", "## Goal: >= x1.5 dense at batch 64 at 50% of the FLOPs removed", ""]
    for name in dict.fromkeys(r["model"] for r in state["rows"]):
        for r in state["rows"]:
            if r["model"] == name and r["target"] == GOAL_FLOPS and "refused" not in r:
                verdict = "**met**" if r["b64"]["speedup"] >= GOAL_SPEEDUP else "**missed**"
                lines.append(f"- {name}, {r.get('setup', 'l2')}, multiple_of={r['multiple_of']} ({100 * r['flops_removed']:.1f}% removed): "
                             f"{verdict}, x{r['b64']['speedup']:.2f}")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines + [""] + state.get("notes", [])) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet,mobilenet,vit")
    parser.add_argument("--flops", default="0.5,0.3", help="fractions of the multiply-adds to remove")
    parser.add_argument("--multiples", default="1,8", help="multiple_of values to compare")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=30, help="alternated repeats per round at batch 64 (x5 at 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--render", action="store_true", help="only rewrite the md from the JSON")
    args = parser.parse_args()
    if args.render:
        with open(args.out + ".json") as f:
            write_md(json.load(f), args.out)
        return
    command = "OMP_NUM_THREADS={} python benchmarks/structured_vision_speed.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "(unset)"), " ".join(shlex.quote(a) for a in sys.argv[1:]))
    state = {"meta": {"command": command, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "load_start": os.getloadavg(), "torch": torch.__version__, "threads": args.threads,
                      "calibration": args.calibration, "test": args.test, "repeats": args.repeats,
                      "rounds": args.rounds}, "rows": []}
    names, setups = args.models.split(","), args.setups.split(",")
    if os.path.exists(args.out + ".json"):  # rows of other models / set-ups stay, with the command that measured them
        with open(args.out + ".json") as f:
            old = json.load(f)
        fresh = {(n, s, float(f), int(m)) for n in names for s in setups for f in args.flops.split(",")
                 for m in args.multiples.split(",")}
        state["rows"] = [r for r in old["rows"]
                         if (r["model"], r.get("setup", "l2"), r["target"], r["multiple_of"]) not in fresh]
        state["notes"] = old.get("notes", [])
        state["tables"] = {n: t for n, t in old.get("tables", {}).items() if n not in names}
        for r in state["rows"]:
            r.setdefault("command", old["meta"]["command"])
    calib = vc.calibration(0, args.calibration)
    tables: dict = {}
    for name in names:
        dense = trained(name).eval()
        for flops in [float(f) for f in args.flops.split(",")]:
            for setup, multiple_of in [(s, int(m)) for s in setups for m in args.multiples.split(",")]:
                r = {**row(name, dense, calib, flops, setup, multiple_of, args, tables), "command": command}
                state["rows"].append(r)
                if "refused" in r:
                    print(f"{name} {flops} {setup} multiple_of={multiple_of}: {r['refused']}", flush=True)
                else:
                    print(f"{name} {flops} {setup} multiple_of={multiple_of}: removed {100 * r['flops_removed']:.1f}% one-shot "
                          f"{r['accuracy']:.2f} b64 x{r['b64']['speedup']:.2f} {r['b64']['speedups']} "
                          f"b1 x{r['b1']['speedup']:.2f}", flush=True)
                for (kind, key), (table, seconds) in tables.items():
                    if key == id(dense):  # this run's tables of the model, kept to explain its rows
                        state.setdefault("tables", {}).setdefault(name, {})[kind] = {
                            "seconds": seconds, "batch": getattr(table, "batch", None),
                            "dense_ms": getattr(table, "dense_ms", None),
                            "widths": getattr(table, "saved_ms", None) or getattr(table, "error", None)}
                with open(args.out + ".json", "w") as f:
                    json.dump(state, f, indent=1)
                write_md(state, args.out)


if __name__ == "__main__":
    main()
