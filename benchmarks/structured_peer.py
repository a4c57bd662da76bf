"""prunekit's structured one-shot beside torch-pruning 1.6.1 on SmolLM2-135M-Instruct (MLP neurons, CPU).

One run, one machine, the same threads: SmolLM2 is loaded here (``load_smollm2``), saved once
with ``save_pretrained`` to a temporary folder with the calibration windows (32 x 256 tokens
from the head of the pydoc text, as in benchmarks/structured_llm.py) and the held-out tail's
token ids. At each size (``--params``: fractions of the decoder layers' parameters) prunekit
prunes first (``prune_structured(structures="mlp", params=p, ...)``: wanda + none, wanda +
lstsq, obs + lstsq); its kept width (1126 / 922 of 1536 at 20% / 30%) is then handed to
benchmarks/peer_torch_pruning.py, run with torch-pruning's venv (``make .venv-tp``; never a
dependency of prunekit) as a subprocess with the same OMP/torch threads, which loads the saved
folder with ``AutoModelForCausalLM.from_pretrained`` and prunes exactly that many MLP channels
per layer with ``MetaPruner`` and ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance``.
Perplexity: ``prunekit.perplexity`` here and a copy of its loop there (the dense model is
scored on both sides as the check). Prune seconds: prunekit's whole ``prune_structured`` call;
torch-pruning's tracing + importance + removal (Taylor: plus the gradient pass). Rows are
written to the JSON and .md as each finishes.

    make bench-structured-peer
    python benchmarks/structured_peer.py --peer-python .venv-tp/bin/python --params 0.2 0.3
    python benchmarks/structured_peer.py --report-only   # rewrite the .md from the JSON (--merge: add runs)

The JSON keeps one entry per run (its command, versions, threads, load and rows); a complete
run replaces older runs of the same sizes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PEER = HERE / "peer_torch_pruning.py"
RUNS = ("prunekit:wanda:none", "prunekit:wanda:lstsq", "prunekit:obs:lstsq",
        "torch-pruning:magnitude", "torch-pruning:taylor")


def decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def peer(python: str, folder: str, threads: int, eval_sequences: int, *args: str) -> dict:
    """One job of peer_torch_pruning.py in torch-pruning's venv; its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the peer sees no prunekit
    cmd = [python, str(PEER), os.path.join(folder, "model"), os.path.join(folder, "tokens.pt"),
           "--threads", str(threads), "--eval-sequences", str(eval_sequences), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args, command: str) -> None:
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # read first: the code that runs is the code at start

    import prunekit as pk
    from prunekit.llm import text_calibration, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(args.threads)
    tok, model = load_smollm2()
    calib_text, eval_text = split_text(pydoc_text())
    ids = tokenize(tok, eval_text)
    calibration = text_calibration(tok, calib_text, seq_len=256, n_sequences=args.sequences, batch_size=8)
    from importlib.metadata import version

    meta = {"command": command, "threads": args.threads, "calibration": f"{args.sequences}x256",
            "eval": f"{args.eval_sequences}x256", "torch": torch.__version__,
            "transformers": version("transformers"), "prunekit": version("prunekit"), "complete": False,
            "params": list(args.params), "runs": list(args.runs), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commit": commit}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "model"))
        torch.save({"calibration": torch.cat([b["input_ids"] for b in calibration]), "eval": ids},
                   os.path.join(tmp, "tokens.pt"))
        dense_dec = decoder_params(model)
        t0 = time.perf_counter()
        meta["dense_perplexity"] = pk.perplexity(model, ids, seq_len=256, max_sequences=args.eval_sequences)
        meta["dense_eval_seconds"] = round(time.perf_counter() - t0, 1)
        got = peer(args.peer_python, tmp, args.threads, args.eval_sequences, "--dense")
        meta["peer_dense_perplexity"] = got["perplexity"]
        meta.update({"torch_pruning": got["torch_pruning"], "peer_torch": got["torch"],
                     "peer_transformers": got["transformers"], "peer_threads": got["threads"]})
        print(f"dense perplexity: prunekit {meta['dense_perplexity']:.4f}, peer {got['perplexity']:.4f}", flush=True)
        write(meta, rows, args.out)
        for amount in args.params:
            keep = None
            for spec in args.runs:
                tool, *how = spec.split(":")
                if tool == "prunekit":
                    method, refine = how
                    pruned = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    pk.prune_structured(pruned, calibration, structures="mlp", params=amount, method=method,
                                        refine=refine, progress=False)
                    seconds = time.perf_counter() - t0
                    widths = [layer.mlp.down_proj.in_features for layer in pruned.model.layers]
                    ppl = pk.perplexity(pruned, ids, seq_len=256, max_sequences=args.eval_sequences)
                    removed, dense_ppl = 1 - decoder_params(pruned) / dense_dec, meta["dense_perplexity"]
                    keep = keep or widths[0]
                    if set(widths) != {keep}:
                        raise RuntimeError(f"prunekit's widths {sorted(set(widths))} differ from {keep} at params={amount}")
                    del pruned
                else:
                    if keep is None:
                        raise ValueError("--runs: put a prunekit run before torch-pruning's at each size "
                                         "(its kept width sets torch-pruning's)")
                    method, refine = how[0], "-"
                    try:
                        got = peer(args.peer_python, tmp, args.threads, args.eval_sequences,
                                   "--importance", method, "--keep", str(keep))
                    except RuntimeError as e:  # recorded, and the other rows still run
                        print(e, file=sys.stderr, flush=True)
                        rows.append({"params_target": amount, "tool": tool, "method": method, "error": str(e)[-500:]})
                        write(meta, rows, args.out)
                        continue
                    widths, seconds, ppl = got["widths"], got["prune_seconds"], got["perplexity"]
                    removed, dense_ppl = got["decoder_params_removed"], meta["peer_dense_perplexity"]
                row = {"params_target": amount, "tool": tool, "method": method, "refine": refine,
                       "intermediate_size": widths[0], "uniform": len(set(widths)) == 1,
                       "decoder_params_removed": round(removed, 5), "perplexity": round(ppl, 3),
                       "x_dense": round(ppl / dense_ppl, 3), "prune_seconds": round(seconds, 1),
                       "load_average": round(os.getloadavg()[0], 2), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
                print(json.dumps(row), flush=True)
                rows.append(row)
                write(meta, rows, args.out)
    meta["complete"] = True
    write(meta, rows, args.out)


def _runs(path: Path) -> list[dict]:
    """The runs stored at ``path`` (a file of the first, single-run layout reads as one run)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    runs = data["runs"] if "runs" in data else [data]
    for run_ in runs:  # the first layout had no start time: its first row's stands in
        if "started" not in run_["meta"]:
            run_["meta"]["started"] = min((r["measured"] for r in run_["rows"] if "measured" in r), default="")
            run_["meta"]["started_is_first_row"] = True
    return runs


def write(meta: dict, rows: list[dict], path: Path, others: list[dict] | None = None) -> None:
    """This run into the JSON beside the runs already there, and the .md; rewritten after every
    row (a stopped run keeps what it measured). A complete run drops older runs of the same sizes."""
    runs = [r for r in (others if others is not None else _runs(path)) if r["meta"]["started"] != meta["started"]]
    if meta.get("complete"):
        sizes = set(meta["params"])
        runs = [r for r in runs if not set(r["meta"].get("params") or
                                           {x["params_target"] for x in r["rows"]}) <= sizes]
    runs = sorted(runs + [{"meta": meta, "rows": rows}], key=lambda r: r["meta"]["started"])
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    report(path)


HEADER = ["| params target | tool | method | refine | intermediate | decoder params removed | perplexity "
          "| x dense | prune s | load avg |", "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]


def _table(rows: list[dict]) -> list[str]:
    lines = list(HEADER)
    for r in sorted(rows, key=lambda r: r["params_target"]):  # sorted() is stable: run order within a size
        if "error" in r:
            lines.append(f"| {r['params_target']:.0%} | {r['tool']} | {r['method']} | failed: see the JSON | | | | | | |")
            continue
        width = str(r["intermediate_size"]) + ("" if r["uniform"] else " (layer 0)")
        lines.append(f"| {r['params_target']:.0%} | {r['tool']} | {r['method']} | {r['refine']} | {width} "
                     f"| {r['decoder_params_removed']:.2%} | {r['perplexity']:.2f} | {r['x_dense']} "
                     f"| {r['prune_seconds']} | {r['load_average']} |")
    return lines


def report(path: Path) -> None:
    """The .md beside ``path``: one table per run, with its command, threads, load and versions."""
    lines = ["# Structured pruning of SmolLM2-135M-Instruct: prunekit and torch-pruning side by side (CPU)", "",
             "`make bench-structured-peer` (`python benchmarks/structured_peer.py`). MLP neurons only, the same "
             "kept width in every layer for both tools, the width prunekit chose for the target. Calibration: "
             "windows of 256 tokens from the head of the pydoc text; perplexity on its held-out tail "
             "(prunekit.perplexity; torch-pruning's venv runs a copy of its loop). Prune seconds: prunekit's whole "
             "prune_structured call; torch-pruning's graph tracing + importance + removal (Taylor: plus the "
             "gradient pass over the calibration windows). x dense divides by each side's own dense perplexity."]
    for run_ in _runs(path):
        meta, rows = run_["meta"], run_["rows"]
        loads = [r["load_average"] for r in rows if "load_average" in r]
        done = {r["params_target"] for r in rows}
        lines += ["", f"## `{meta['command']}`", "",
                  ("First row " if meta.get("started_is_first_row") else "Started ") + meta["started"] + (f", commit {meta['commit']}" if meta.get("commit") else "")
                  + f"; calibration {meta['calibration']}, perplexity on {meta['eval']} tokens; "
                  + ("complete." if meta.get("complete") else
                     f"**partial** (stopped, or still running): rows for {', '.join(f'{p:.0%}' for p in sorted(done))} only."),
                  "", *_table(rows), "",
                  f"Dense perplexity: {meta['dense_perplexity']:.4f} in prunekit's process, "
                  f"{meta.get('peer_dense_perplexity', float('nan')):.4f} in torch-pruning's. Threads "
                  f"{meta['threads']} (peer {meta.get('peer_threads')}); load average over the rows "
                  f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f}. prunekit {meta['prunekit']}, torch "
                  f"{meta['torch']}, transformers {meta['transformers']}; torch-pruning {meta.get('torch_pruning')} "
                  f"with torch {meta.get('peer_torch')}, transformers {meta.get('peer_transformers')}."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def merge(path: Path, others: list[Path]) -> None:
    """Fold the runs stored in ``others`` into ``path`` (runs written to separate files)."""
    runs = _runs(path)
    starts = {r["meta"]["started"] for r in runs}
    runs += [r for o in others for r in _runs(o) if r["meta"]["started"] not in starts]
    path.write_text(json.dumps({"runs": sorted(runs, key=lambda r: r["meta"]["started"])}, indent=1) + "\n")
    report(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default=str(ROOT / ".venv-tp" / "bin" / "python"),
                   help="the python of torch-pruning's venv (make .venv-tp)")
    p.add_argument("--params", type=float, nargs="+", default=[0.2, 0.3],
                   help="fractions of the decoder layers' parameters to remove")
    p.add_argument("--runs", nargs="+", default=list(RUNS),
                   help="prunekit:METHOD:REFINE or torch-pruning:magnitude|taylor, in order (a prunekit run first)")
    p.add_argument("--sequences", type=int, default=32, help="calibration sequences of 256 tokens")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "structured_peer.json")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the JSON")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="with --report-only: fold the runs stored in these JSON files into --out")
    args = p.parse_args(argv)
    if args.report_only:
        merge(args.out, args.merge)
        return
    if not os.path.exists(args.peer_python):
        raise FileNotFoundError(f"--peer-python {args.peer_python} does not exist; build it with `make .venv-tp`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python benchmarks/structured_peer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run(args, command.strip())


if __name__ == "__main__":
    sys.exit(main())
