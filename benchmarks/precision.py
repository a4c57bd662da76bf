"""Float32 against float64 statistics on SmolLM2-135M, on this machine's CPU: time and perplexity.

Runs ``benchmarks/llm.py --one`` (each in its own process) for SparseGPT and Wanda at 50% and
2:4, alternating the two precisions ``--repeats`` times, and writes the medians to
``results/precision.json`` / ``precision.md``.

    python benchmarks/precision.py --threads 2 --sequences 32 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm import RESULTS, run_in_subprocess  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--runs", default="sparsegpt:0.5,sparsegpt:2:4,wanda:0.5,wanda:2:4")
    args = p.parse_args()
    rows = []
    for run in args.runs.split(","):
        method, pattern = run.split(":", 1)
        times: dict[str, list[float]] = {"float32": [], "float64": []}
        ppl: dict[str, float] = {}
        for _ in range(args.repeats):
            for dtype in ("float32", "float64"):  # alternated: the same machine conditions for both
                row = run_in_subprocess([method, pattern, "--threads", str(args.threads), "--sequences",
                                         str(args.sequences), "--stats-dtype", dtype])
                if row is None:
                    continue
                times[dtype].append(row["seconds"])
                ppl[dtype] = row["perplexity"]
        if not (times["float32"] and times["float64"]):
            continue
        t32, t64 = statistics.median(times["float32"]), statistics.median(times["float64"])
        rows.append({"method": method, "pattern": pattern, "calibration": f"{args.sequences}x256",
                     "threads": args.threads, "seconds_float32": t32, "seconds_float64": t64,
                     "time_ratio_32_over_64": round(t32 / t64, 3), "perplexity_float32": ppl["float32"],
                     "perplexity_float64": ppl["float64"],
                     "perplexity_change": round(ppl["float32"] / ppl["float64"] - 1, 4), "repeats": args.repeats})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(RESULTS, "precision.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["# float32 vs float64 statistics, SmolLM2-135M on the CPU", "",
             f"`python benchmarks/precision.py --threads {args.threads} --sequences {args.sequences} "
             f"--repeats {args.repeats}`: median seconds of alternated runs, each in its own process.", "",
             "| method | pattern | s float32 | s float64 | ratio | ppl float32 | ppl float64 | change |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['seconds_float32']} | {r['seconds_float64']} | "
                     f"{r['time_ratio_32_over_64']} | {r['perplexity_float32']} | {r['perplexity_float64']} | "
                     f"{100 * r['perplexity_change']:+.2f}% |")
    with open(os.path.join(RESULTS, "precision.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
