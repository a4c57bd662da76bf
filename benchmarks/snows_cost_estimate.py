"""Estimate a full SNOWS run's time from a one-Newton-step run (``snows_cost.py --images 32``),
scaled by a reference network measured both ways (issue 20 item 6: the EfficientNet-class
network could not be run end to end on a quiet machine).

    estimate = reference full run (wall s, quiet) x this network's CPU s / the reference's CPU s

both CPU figures from ``--images 32`` runs (one Newton step per layer) at the same thread count.
Per layer kind, the estimate is split by each kind's share of the refits' CPU seconds. It is an
estimate, not a measurement: the two one-step runs may have run under different loads (recorded).

Writes ``<out>.json`` and ``<out>.md`` with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def kind_cpu(run: dict) -> dict[str, dict[str, float]]:
    """CPU seconds of the refits and their count, per layer kind."""
    names = {row["name"]: row["kind"] for row in run["layers"]}
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"refits": 0, "cpu": 0.0})
    for row in run["per_layer"]:
        kind = names.get(re.sub(r"\.weight\[g\d+\]$", "", row["layer"]), "?")
        out[kind]["refits"] += 1
        out[kind]["cpu"] += row["cpu"]
    return dict(out)


def estimate(one_step: dict, ref_one_step: dict, ref_full: dict, assume: dict[str, str] | None = None) -> dict:
    kinds = kind_cpu(one_step)
    cpu = one_step["total_cpu_seconds"]
    for kind, like in (assume or {}).items():  # e.g. SE refits costing what a pointwise refit does
        if kind in kinds and like in kinds:
            new = kinds[kind]["refits"] * kinds[like]["cpu"] / kinds[like]["refits"]
            cpu += new - kinds[kind]["cpu"]
            kinds[kind] = {"refits": kinds[kind]["refits"], "cpu": new}
    ratio = cpu / ref_one_step["total_cpu_seconds"]
    total = ref_full["total_seconds"] * ratio
    refit_cpu = sum(k["cpu"] for k in kinds.values())
    refit_share = refit_cpu / cpu
    per_kind = {kind: {"refits": k["refits"], "one_step_cpu_s": k["cpu"],
                       "estimated_wall_s": total * refit_share * k["cpu"] / refit_cpu,
                       "estimated_wall_s_per_refit": total * refit_share * k["cpu"] / refit_cpu / k["refits"]}
                for kind, k in sorted(kinds.items())}
    return {"cpu_ratio": ratio, "estimated_total_wall_s": total, "refit_share": refit_share, "per_kind": per_kind,
            "one_step_cpu_s": cpu, "assume": assume or {}, "ref_one_step_cpu_s": ref_one_step["total_cpu_seconds"],
            "ref_full_wall_s": ref_full["total_seconds"],
            "loads": {name: run.get("machine", {}).get("load_before", float("nan"))
                      for name, run in (("one_step", one_step), ("ref_one_step", ref_one_step), ("ref_full", ref_full))}}


def write_md(out: dict, path: str) -> None:
    assumed = "".join(f", {k} refits counted at the mean CPU s of a {v} refit" for k, v in out["assume"].items())
    rows = "\n".join(f"| {kind} | {k['refits']} | {k['one_step_cpu_s']:.1f} | {k['estimated_wall_s']:.0f} | "
                     f"{k['estimated_wall_s_per_refit']:.1f} |" for kind, k in out["per_kind"].items())
    text = f"""# SNOWS on an EfficientNet-class network: estimated full-run time (not a measurement)

`{out['command']}`

One Newton step per layer (`--images 32`){assumed}: this network {out['one_step_cpu_s']:.1f} CPU s against the
reference's {out['ref_one_step_cpu_s']:.1f} CPU s (x{out['cpu_ratio']:.2f}). The reference's full run (128 images, 2 threads,
quiet) took {out['ref_full_wall_s']:.0f} s, so this network's full run would take about
**{out['estimated_total_wall_s']:.0f} s ({out['estimated_total_wall_s'] / 60:.1f} min)**. Load average (1 min) when the runs
started: this one-step run {out['loads']['one_step']:.2f}, the reference's {out['loads']['ref_one_step']:.2f}, the reference full
run {out['loads']['ref_full']:.2f}. The refits were
{100 * out['refit_share']:.0f}% of the one-step run's CPU time; the rest (statistics, block propagation, checks) is
split with them below.

What this cannot see: how each network's operations scale from the one-step runs' thread count to
the full run's (the double backward of a grouped convolution's weight gradient loops over the
groups, hundreds of small parallel calls, which 2 threads may run worse than 1); trained
weights, which change how many CG iterations and line-search trials each refit needs (random
weights give tiny gradients in some layers: CG stops before any product there).

| layer kind | refits | one-step CPU s | estimated full-run wall s | per refit |
|---|---:|---:|---:|---:|
{rows}
"""
    with open(path, "w") as fh:
        fh.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one-step", required=True, help="this network's snows_cost.py --images 32 JSON")
    ap.add_argument("--ref-one-step", required=True, help="the reference's --images 32 JSON (a snows_cost run, "
                    "or FILE:KEY.KEY for a run nested in a JSON)")
    ap.add_argument("--ref-full", required=True, help="the reference's full-run JSON")
    ap.add_argument("--assume", action="append", default=[], metavar="KIND=LIKE",
                    help="count KIND's refits at LIKE's mean CPU s per refit (e.g. squeeze-excitation=pointwise)")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()

    def load(spec: str) -> dict:
        path, _, keys = spec.partition(":")
        with open(path) as fh:
            data = json.load(fh)
        for key in filter(None, keys.split(".")):
            data = data[key]
        return data
    assume = dict(a.split("=", 1) for a in args.assume)
    out = estimate(load(args.one_step), load(args.ref_one_step), load(args.ref_full), assume)
    out["command"] = "python " + " ".join(["benchmarks/snows_cost_estimate.py"] + sys.argv[1:])
    with open(args.out + ".json", "w") as fh:
        json.dump(out, fh, indent=1)
    write_md(out, args.out + ".md")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
