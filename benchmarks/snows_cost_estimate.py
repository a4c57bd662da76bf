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


def estimate(one_step: dict, ref_one_step: dict, ref_full: dict) -> dict:
    ratio = one_step["total_cpu_seconds"] / ref_one_step["total_cpu_seconds"]
    total = ref_full["total_seconds"] * ratio
    kinds = kind_cpu(one_step)
    refit_cpu = sum(k["cpu"] for k in kinds.values())
    refit_share = refit_cpu / one_step["total_cpu_seconds"]
    per_kind = {kind: {"refits": k["refits"], "one_step_cpu_s": k["cpu"],
                       "estimated_wall_s": total * refit_share * k["cpu"] / refit_cpu,
                       "estimated_wall_s_per_refit": total * refit_share * k["cpu"] / refit_cpu / k["refits"]}
                for kind, k in sorted(kinds.items())}
    return {"cpu_ratio": ratio, "estimated_total_wall_s": total, "refit_share": refit_share, "per_kind": per_kind,
            "one_step_cpu_s": one_step["total_cpu_seconds"], "ref_one_step_cpu_s": ref_one_step["total_cpu_seconds"],
            "ref_full_wall_s": ref_full["total_seconds"],
            "loads": {"one_step": one_step.get("machine", {}).get("load_before"),
                      "ref_full": ref_full.get("machine", {}).get("load_before")}}


def write_md(out: dict, path: str) -> None:
    rows = "\n".join(f"| {kind} | {k['refits']} | {k['one_step_cpu_s']:.1f} | {k['estimated_wall_s']:.0f} | "
                     f"{k['estimated_wall_s_per_refit']:.1f} |" for kind, k in out["per_kind"].items())
    text = f"""# SNOWS on an EfficientNet-class network: estimated full-run time (not a measurement)

`{out['command']}`

One Newton step per layer (`--images 32`): this network {out['one_step_cpu_s']:.1f} CPU s against the
reference's {out['ref_one_step_cpu_s']:.1f} CPU s (x{out['cpu_ratio']:.2f}). The reference's full run (128 images, 2 threads,
quiet) took {out['ref_full_wall_s']:.0f} s, so this network's full run would take about
**{out['estimated_total_wall_s']:.0f} s ({out['estimated_total_wall_s'] / 60:.1f} min)**. Load average (1 min) when the one-step run
started: {out['loads']['one_step']}; the reference full run: {out['loads']['ref_full']}. The refits were
{100 * out['refit_share']:.0f}% of the one-step run's CPU time; the rest (statistics, block propagation, checks) is
split with them below.

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
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()

    def load(spec: str) -> dict:
        path, _, keys = spec.partition(":")
        with open(path) as fh:
            data = json.load(fh)
        for key in filter(None, keys.split(".")):
            data = data[key]
        return data
    out = estimate(load(args.one_step), load(args.ref_one_step), load(args.ref_full))
    out["command"] = "python " + " ".join(["benchmarks/snows_cost_estimate.py"] + sys.argv[1:])
    with open(args.out + ".json", "w") as fh:
        json.dump(out, fh, indent=1)
    write_md(out, args.out + ".md")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
