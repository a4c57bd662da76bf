"""Prune SmolLM2-135M-Instruct one shot and measure perplexity, time and peak memory.

Every method x pattern runs in its own subprocess, so each peak resident set (VmHWM) is that
run's alone. Calibration is the head of the standard library's pydoc text, evaluation its
held-out tail (disjoint). Results are appended to ``benchmarks/results/llm.json`` as each run
finishes (a rerun skips the rows already there; ``--fresh`` starts over), then written as
``llm.md``.

    python benchmarks/llm.py                       # the whole grid (make bench-llm)
    python benchmarks/llm.py --one sparsegpt 0.5   # one run, printed as a JSON line
    python benchmarks/llm.py --one sparsegpt 0.5 --threads 2 --no-eval   # time/memory only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prunekit.zoo.memory import reset_peak, resident_mib  # noqa: E402
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT = "The Python programming language is"
METHODS = ["magnitude", "wanda", "sparsegpt", "wanda+lstsq", "sparsegpt+lstsq"]
PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
SNOWS_PATTERNS = ["0.5", "2:4"]


def run_one(args) -> dict:
    """Load the model, prune it once, evaluate; returns one result row."""
    import prunekit as pk
    from prunekit.llm import decoder_blocks, generate_sample, text_calibration, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok, model = load_smollm2(num_layers=args.layers)
    calib_text, eval_text = split_text(pydoc_text())
    method, _, refine = args.one[0].partition("+")
    pattern = args.one[1]
    unstructured = ":" not in pattern
    row = {"method": args.one[0], "pattern": pattern if not unstructured else f"{float(pattern):.0%}",
           "layers": len(model.model.layers), "threads": args.threads,
           "calibration": f"{args.sequences}x{args.seq_len}"}
    calibration = None
    if method != "magnitude" or refine:
        calibration = text_calibration(tok, calib_text, seq_len=args.seq_len, n_sequences=args.sequences,
                                       batch_size=args.batch, model=model)
        with torch.no_grad():  # warm up kernels and the allocator once, as any forward would
            model(**calibration[0])
    reset_peak()
    before = resident_mib("VmRSS")
    start = time.perf_counter()
    result = pk.prune(model, calibration, sparsity=float(pattern) if unstructured else None,
                      pattern="unstructured" if unstructured else pattern, method=method, refine=refine or None,
                      blocks=decoder_blocks(model), progress=False, stats_dtype=args.stats_dtype,
                      refine_options={"k": args.k, "epochs": 1, "max_cg": args.max_cg} if refine == "snows" else None)
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["stats_dtype"] = result.stats_dtype
    row["peak_growth_mib"] = round(resident_mib("VmHWM") - before, 0)
    row["rss_before_mib"] = round(before, 0)
    row["model_mib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 0)
    # prune() once kept a copy of the target weights in memory to restore the model on failure;
    # its restore point is now on disk (prunekit.oneshot.runtime.restore), so rows written since hold 0
    # here and the whole growth is the working memory of one decoder layer.
    row["restore_copy_mib"] = 0
    row["sparsity"] = round(result.sparsity, 4)
    row["pruned_layers"] = len(result.layers)
    notes = {r.name: r.note for r in result.layers if r.note}
    if notes:
        row["notes"] = notes
    ratios = [r.lookahead_after / r.lookahead_before for r in result.layers if r.lookahead_before]
    if ratios:  # SNOWS: how much each layer's lookahead loss fell (median over layers)
        row["lookahead_after_over_before_median"] = round(sorted(ratios)[len(ratios) // 2], 4)
    if not args.no_eval:
        ids = tokenize(tok, eval_text)
        row["perplexity"] = round(pk.perplexity(model, ids, seq_len=args.seq_len, max_sequences=args.eval_sequences), 2)
        row["sample"] = generate_sample(model, tok, PROMPT, max_new_tokens=30)
    if args.save_check:
        row.update(save_check(model, tok, ids if not args.no_eval else tokenize(tok, eval_text), args))
    return row


def save_check(model, tok, ids, args) -> dict:
    """Save the pruned model as a plain Hugging Face checkpoint and compressed; reload the plain
    one with transformers alone and check weights, perplexity and generation are unchanged."""
    import tempfile

    import prunekit as pk
    from transformers import AutoModelForCausalLM

    from prunekit.llm import generate_sample

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/hf")
        tok.save_pretrained(f"{tmp}/hf")
        back = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32).eval()
        same = all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), back.state_dict().values()))
        pk.save(model, f"{tmp}/model.prunekit.safetensors")
        sizes = {"hf_mib": round(sum(os.path.getsize(f"{tmp}/hf/{f}") for f in os.listdir(f"{tmp}/hf")
                                     if f.endswith(".safetensors")) / 2**20, 1),
                 "compressed_mib": round(os.path.getsize(f"{tmp}/model.prunekit.safetensors") / 2**20, 1)}
        return {"reloaded_weights_equal": same,
                "reloaded_perplexity": round(pk.perplexity(back, ids, seq_len=args.seq_len,
                                                           max_sequences=args.eval_sequences), 2),
                "reloaded_sample": generate_sample(back, tok, PROMPT, max_new_tokens=30), **sizes}


def dense_row(args) -> dict:
    import prunekit as pk
    from prunekit.llm import generate_sample, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(args.threads)
    tok, model = load_smollm2()
    ids = tokenize(tok, split_text(pydoc_text())[1])
    return {"method": "dense", "pattern": "-", "layers": len(model.model.layers), "sparsity": 0.0,
            "perplexity": round(pk.perplexity(model, ids, seq_len=args.seq_len, max_sequences=args.eval_sequences), 2),
            "sample": generate_sample(model, tok, PROMPT, max_new_tokens=30)}


def run_in_subprocess(one_args: list[str]) -> dict | None:
    """One ``--one`` run in its own process (so its peak memory is its own); its result row, or
    None after printing why it failed."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", *one_args], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{' '.join(one_args[:2])} failed:\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def grid(args) -> list[tuple[str, str, int | None, int]]:
    """(method, pattern, decoder layers kept or None, calibration sequences) of every run."""
    # least-squares refits (about 15 min each on one thread) only at 50% and 2:4, where
    # SparseGPT is compared with SNOWS
    runs = [(m, p, None, args.sequences) for p in PATTERNS for m in METHODS
            if "lstsq" not in m or p in SNOWS_PATTERNS]
    half = 15
    runs += [(m, "0.5", half, args.sequences) for m in ["magnitude", "wanda", "sparsegpt", "wanda+lstsq"]]
    # SNOWS is run on fewer sequences (its cost is Hessian-vector products on every batch); its
    # SparseGPT starting point on the same sequences is the row to compare it with.
    if not args.no_snows:
        runs += [(m, p, None, args.snows_sequences) for p in SNOWS_PATTERNS for m in ("sparsegpt", "sparsegpt+snows")]
    return runs


def key(row: dict) -> tuple:
    return row["method"], row["pattern"], row.get("layers"), row.get("calibration")


def write_markdown(rows: list[dict], path: str) -> None:
    """llm.md (and llm.png) from the result rows, plus llm_memory.json when it exists."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    base = dense["perplexity"] if dense else None
    def order(r):  # pattern, then the 64-sequence rows before the SNOWS comparison, then method
        pattern = r["pattern"] if ":" in r["pattern"] else str(float(r["pattern"].rstrip("%")) / 100)
        rank = PATTERNS.index(pattern) if pattern in PATTERNS else len(PATTERNS)
        method = METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS)
        return rank, -int(r["calibration"].split("x")[0]), method

    full = sorted((r for r in rows if r["method"] != "dense" and r.get("layers") == 30), key=order)
    half = {(r["method"], r["pattern"], r["calibration"]): r for r in rows if r.get("layers") == 15}
    lines = ["# SmolLM2-135M-Instruct, one-shot pruning of all 210 decoder linear layers", "",
             "`python benchmarks/llm.py` (make bench-llm). Calibration: the first 80% of the standard library's",
             "pydoc text; perplexity: its held-out last 20%. One run per row, each in its own process, 1 thread",
             "unless marked (timings on a shared 2-core machine). Memory: growth of the peak resident set over",
             "the resident set just before pruning (model loaded, one warm-up forward). Statistics: float64 in",
             "the rows of this table (the CPU default until stop 17; float32 is the default since, see",
             "precision.md for both on four of these rows).", ""]
    if dense:
        lines += [f"Dense perplexity: **{base}**.", ""]
    lines += ["| method | pattern | calibration | sparsity | perplexity | x dense | prune s | peak growth MiB | "
              "of which restore copy | working MiB, 30 layers | working MiB, 15 layers |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in full:
        ppl = r.get("perplexity")
        ratio = f"{ppl / base:.2f}" if ppl and base else "-"
        h = half.get((r["method"], r["pattern"], r["calibration"]))
        work_half = f"{h['peak_growth_mib'] - h['restore_copy_mib']:.0f}" if h else "-"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['calibration']} | {r['sparsity']:.4f} | {ppl if ppl is not None else '-'} | "
                     f"{ratio} | {r['seconds']} | {r['peak_growth_mib']:.0f} | {r['restore_copy_mib']:.0f} | "
                     f"{r['peak_growth_mib'] - r['restore_copy_mib']:.0f} | {work_half} |")
    lines += ["", "Working memory = peak growth minus the restore copy of the target weights that `prune()` kept in",
              "memory to undo a failed run until its restore point moved to disk (rows measured since show 0",
              "there). The memory columns of this table were",
              "measured before two fixes: `prune()`'s early data check then ran the whole model, so a batch's",
              "LM-head logits (8 x 256 x 49152 floats = 384 MiB) set the peak, and freed heap was not returned",
              "before the baseline was read. The table below is measured after them."]
    memory = os.path.join(os.path.dirname(path), "llm_memory.json")
    if os.path.exists(memory):
        mem = sorted(json.load(open(memory)), key=lambda r: (METHODS.index(r["method"]), -r["layers"]))
        lines += ["", "## Memory against depth", "",
                  "`python benchmarks/llm.py --memory`: 50%, 64 x 256 calibration, no evaluation, the whole model",
                  "and the model cut to its first 15 decoder layers.", "",
                  "| method | decoder layers | peak growth MiB | restore copy MiB | working MiB | prune s |",
                  "|---|---|---|---|---|---|"]
        for r in mem:
            lines.append(f"| {r['method']} | {r['layers']} | {r['peak_growth_mib']:.0f} | {r['restore_copy_mib']:.0f} | "
                         f"{r['peak_growth_mib'] - r['restore_copy_mib']:.0f} | {r['seconds']} |")
    lines += ["", "## Greedy samples", "", f"Prompt: `{PROMPT}`", ""]
    for r in ([dense] if dense else []) + full:
        if r.get("sample") is not None:
            text = " ".join(r["sample"].split())
            lines.append(f"- **{r['method']} {r['pattern']}**: {text}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_rows = [{**r, "sparsity": 100 * r["sparsity"]} for r in full
                 if r["pattern"].endswith("%") and r.get("perplexity") and r["calibration"].startswith("64x")]
    if plot_rows:
        from prunekit.plots import plot_metric_vs_sparsity

        plot_metric_vs_sparsity(plot_rows, path.replace(".md", ".png"), x="sparsity", y="perplexity", logy=True,
                                title=f"SmolLM2-135M, unstructured (dense perplexity {base})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("METHOD", "PATTERN"),
                   help="one run: METHOD is magnitude|wanda|sparsegpt[+lstsq|+snows], PATTERN a sparsity or N:M")
    p.add_argument("--layers", type=int, default=None, help="keep only the first decoder layers")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sequences", type=int, default=64, help="calibration sequences")
    p.add_argument("--snows-sequences", type=int, default=16, help="calibration sequences for SNOWS runs")
    p.add_argument("--snows-batch", type=int, default=4,
                   help="batch size of SNOWS runs (each batch but one is a Newton step)")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=3, help="SNOWS lookahead")
    p.add_argument("--max-cg", type=int, default=10, help="SNOWS CG iterations per Newton step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats-dtype", choices=["float32", "float64"], default=None,
                   help="precision of statistics and solvers (default: prunekit's, float32)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--save-check", action="store_true",
                   help="with --one: save as a plain HF checkpoint, reload with transformers, compare")
    p.add_argument("--fresh", action="store_true", help="ignore rows already in llm.json")
    p.add_argument("--results", default=None, help="JSON file of the rows (default: results/llm.json)")
    p.add_argument("--skip", default=None, help="skip grid rows whose method contains this string")
    p.add_argument("--no-snows", action="store_true", help="leave out the SNOWS rows (and their SparseGPT twins)")
    p.add_argument("--memory", action="store_true", help="only the memory-against-depth runs (llm_memory.json)")
    p.add_argument("--markdown", action="store_true", help="only rewrite llm.md from llm.json")
    p.add_argument("--only", default=None, help="run only grid rows whose method contains this string")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    os.makedirs(RESULTS, exist_ok=True)
    path = args.results or os.path.join(RESULTS, "llm.json")
    rows = [] if args.fresh or not os.path.exists(path) else json.load(open(path))
    if args.markdown:
        write_markdown(rows, os.path.join(RESULTS, "llm.md"))
        return
    if args.memory:
        mem = []
        for method in ("magnitude", "wanda", "sparsegpt"):
            for layers in (30, 15):
                row = run_in_subprocess([method, "0.5", "--no-eval", "--layers", str(layers), "--threads", str(args.threads)])
                if row is None:
                    raise SystemExit(1)
                mem.append(row)
        with open(os.path.join(RESULTS, "llm_memory.json"), "w") as f:
            json.dump(mem, f, indent=1)
        write_markdown(rows, os.path.join(RESULTS, "llm.md"))
        return
    if not any(r["method"] == "dense" for r in rows):
        rows.insert(0, dense_row(args))
        print(json.dumps(rows[0]), flush=True)
    done = {key(r) for r in rows}
    for method, pattern, layers, sequences in grid(args):
        label = pattern if ":" in pattern else f"{float(pattern):.0%}"
        if (method, label, layers or 30, f"{sequences}x{args.seq_len}") in done or (args.only and args.only not in method) \
                or (args.skip and any(part in method for part in args.skip.split(","))):
            continue
        snows_run = sequences == args.snows_sequences and sequences != args.sequences
        cmd = [method, pattern, "--threads", str(args.threads),
               "--seq-len", str(args.seq_len), "--eval-sequences", str(args.eval_sequences),
               "--batch", str(args.snows_batch if snows_run else args.batch), "--sequences", str(sequences),
               "--k", str(args.k), "--max-cg", str(args.max_cg)]
        if layers:
            cmd += ["--layers", str(layers), "--no-eval"]
        row = run_in_subprocess(cmd)
        if row is None:
            continue
        rows.append(row)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    write_markdown(rows, os.path.join(RESULTS, "llm.md"))
    print(open(os.path.join(RESULTS, "llm.md")).read())


if __name__ == "__main__":
    main()
