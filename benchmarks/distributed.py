"""SmolLM2-135M's calibration on 1 process against 2 (torch.distributed, gloo, CPU).

SparseGPT at 50%, 32 x 256 calibration sequences from the pydoc text (8 batches of 4), one
thread per process. The 2-process run gives every rank the full list with
``shard_calibration=True`` (16 sequences each); statistics are summed with ``all_reduce``.
Each configuration runs in fresh processes (spawned, gloo over TCP on 127.0.0.1), the two
alternated over ``--rounds`` (the order flips every round), and the medians are reported:

* ``prune_s``: ``prune()``'s wall time on rank 0;
* ``statistics_s``: the part outside the per-layer solves (``result.seconds`` minus the layers'
  own seconds): the forward passes, the statistics and their ``all_reduce``, which the ranks share;
* ``solve_s``: the per-layer SparseGPT solves, which every rank repeats on the summed statistics.

    python benchmarks/distributed.py --rounds 3            # writes results/distributed.json and .md
    python benchmarks/distributed.py --rounds 1 --layers 4 # a quick look
    python benchmarks/distributed.py --markdown            # rewrite the .md from the .json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, procs: int, port: int, layers: int | None, out: str) -> None:
    """One process: load, calibrate, prune; rank 0 writes its timings to ``out``."""
    import torch.distributed as dist

    import prunekit as pk
    from prunekit.llm import decoder_blocks, text_calibration
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(1)
    if procs > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=procs,
                                timeout=datetime.timedelta(minutes=30))
    try:
        tok, model = load_smollm2(num_layers=layers)
        calib_text, _ = split_text(pydoc_text())
        batches = text_calibration(tok, calib_text, seq_len=256, n_sequences=32, batch_size=4, model=model)
        with torch.no_grad():  # warm up kernels and the allocator once, as any forward would
            model(**batches[0])
        result = pk.prune(model, batches, sparsity=0.5, method="sparsegpt", blocks=decoder_blocks(model),
                          shard_calibration=procs > 1, progress=False)
        solve = sum(r.seconds for r in result.layers)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"processes": procs, "prune_s": result.seconds, "solve_s": solve,
                           "statistics_s": result.seconds - solve, "sparsity": result.sparsity,
                           "layers": len(model.model.layers), "processes_reported": result.processes}, f)
    finally:
        if procs > 1:
            dist.destroy_process_group()


def run_config(procs: int, layers: int | None) -> dict:
    """One configuration in a fresh interpreter (so no state is shared between runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        cmd = [sys.executable, __file__, "--worker", str(procs), "--out", out]
        if layers:
            cmd += ["--layers", str(layers)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        row = json.load(open(out))
        row["process_wall_s"] = time.perf_counter() - start
        return row


def _worker_main(procs: int, layers: int | None, out: str) -> None:
    if procs == 1:
        _rank(0, 1, 0, layers, out)
        return
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(procs, _free_port(), layers, out), nprocs=procs, join=True)


def markdown(rows: list[dict], meta: dict) -> str:
    def med(procs: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["processes"] == procs)

    lines = ["# Calibration over 1 vs 2 processes (SmolLM2-135M, SparseGPT 50%)", "",
             f"Command: `{meta['command']}`", "", meta["machine"], "",
             f"{meta['layers']} decoder layers, 32 x 256 calibration sequences (8 batches of 4), float64 statistics, "
             f"1 thread per process, gloo on 127.0.0.1; {meta['rounds']} rounds, configurations alternated; "
             "medians (seconds).", "",
             "| processes | prune() | statistics pass (forwards + statistics + all_reduce) | per-layer solves | runs |",
             "|---|---|---|---|---|"]
    for p in (1, 2):
        n = sum(r["processes"] == p for r in rows)
        lines.append(f"| {p} | {med(p, 'prune_s'):.1f} | {med(p, 'statistics_s'):.1f} | {med(p, 'solve_s'):.1f} | {n} |")
    lines += ["", f"Speed-up of 2 processes: statistics pass x{med(1, 'statistics_s') / med(2, 'statistics_s'):.2f}, "
              f"whole prune() x{med(1, 'prune_s') / med(2, 'prune_s'):.2f} (every rank repeats the per-layer "
              "solves on the summed statistics, so only the statistics pass is shared).", "",
              f"The per-layer solves are the same work in both configurations, yet took x{med(2, 'solve_s') / med(1, 'solve_s'):.2f} "
              "as long with 2 processes: the CPU time each process got, relative to the single process. Near x1 "
              "the machine had a free core for the second process; near x2 it had none, and no speed-up can show.", "",
              "Every run, in order:", "", "| round | processes | prune() | statistics | solves |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['processes']} | {r['prune_s']:.1f} | {r['statistics_s']:.1f} | {r['solve_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first decoder layers")
    parser.add_argument("--machine", default="", help="a note on the machine (e.g. contended)")
    parser.add_argument("--markdown", action="store_true", help="rewrite distributed.md from distributed.json")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker_main(args.worker, args.layers, args.out)
        return
    if args.markdown:
        saved = json.load(open(os.path.join(RESULTS, "distributed.json")))
        with open(os.path.join(RESULTS, "distributed.md"), "w") as f:
            f.write(markdown(saved["runs"], saved["meta"]))
        return
    rows = []
    for i in range(args.rounds):
        for procs in ((1, 2) if i % 2 == 0 else (2, 1)):
            row = run_config(procs, args.layers)
            row["round"] = i + 1
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"command": shlex.join(["python", "benchmarks/distributed.py", *sys.argv[1:]]), "rounds": args.rounds,
            "layers": rows[0]["layers"], "machine": args.machine, "cpus": os.cpu_count()}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "distributed.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "distributed.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
