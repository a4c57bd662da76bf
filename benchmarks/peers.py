"""prunekit against llm-compressor on SmolLM2-135M: SparseGPT and Wanda at 50% and 2:4, CPU.

Both tools prune the same model folder (SmolLM2 dequantised once from its GGUF file and saved
as safetensors + config + tokenizer under ``.cache/peers/``) with the same 32 x 256 token
windows (``prunekit.llm.text_calibration`` on the head of the pydoc text); each pruned model is
then scored by one evaluator (``prunekit.perplexity`` on the held-out tail, in prunekit's
environment). Every run is its own process with the same thread count; the two tools alternate
(the one going first swaps every repeat) and the table gives medians of wall time and of peak
resident-memory growth above the loaded model. llm-compressor (PyPI ``llmcompressor``) lives in
its own venv (``make .venv-peers``); it is never a dependency of prunekit. Each tool runs with
its own defaults, except the batching of the calibration windows: both get one sequence per
batch (llm-compressor's default; ``--batch`` changes prunekit's). prunekit's peak memory grows
with the batch it is given (a decoder layer's activations for the whole batch).

    make bench-peers                      # set-up + the whole run (estimated 15-20 min on a quiet 2-core machine)
    python benchmarks/peers.py --peer-python .venv-peers/bin/python --repeats 2
    python benchmarks/peers.py --markdown # rewrite peers.md from peers.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(ROOT, ".cache", "peers")
MODEL_DIR = os.path.join(CACHE, "smollm2")
RUNS = "sparsegpt:0.5,sparsegpt:2:4,wanda:0.5,wanda:2:4"
SEQ_LEN, SEQUENCES, EVAL_SEQUENCES = 256, 32, 32


# -- memory (kept here: the peer's venv has no prunekit) ----------------------------------------
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Give freed heap back (malloc_trim), then restart VmHWM from the current resident set."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- set-up (prunekit's venv) -------------------------------------------------------------------
def prepare() -> None:
    """Save SmolLM2 as a plain safetensors folder and the calibration / evaluation token ids."""
    import torch

    if os.path.exists(os.path.join(CACHE, "tokens.pt")):
        return
    from prunekit.llm import text_calibration, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    tok, model = load_smollm2()  # dequantised to float32, quantization_config dropped
    os.makedirs(MODEL_DIR, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tok.save_pretrained(MODEL_DIR)
    calib_text, eval_text = split_text(pydoc_text())
    batches = text_calibration(tok, calib_text, seq_len=SEQ_LEN, n_sequences=SEQUENCES, model=model)
    torch.save({"calibration": torch.cat([b["input_ids"] for b in batches]),
                "eval": tokenize(tok, eval_text)}, os.path.join(CACHE, "tokens.pt"))


def _load(threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return model, torch.load(os.path.join(CACHE, "tokens.pt"))


def _save_pruned(model, path: str) -> float:
    """The pruned linear weights of the decoder layers to ``path``; their sparsity."""
    from safetensors.torch import save_file

    weights = {n: p.detach().contiguous() for n, p in model.named_parameters()
               if ".layers." in n and n.endswith("proj.weight")}
    save_file(weights, path)
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


# -- one run, in its own process ----------------------------------------------------------------
def run_prunekit(method: str, pattern: str, threads: int, out: str, batch: int = 1,
                  stats_dtype: str | None = None) -> dict:
    import torch

    import prunekit as pk
    from prunekit.llm import decoder_blocks

    model, tokens = _load(threads)
    batches = [{"input_ids": b, "use_cache": False} for b in tokens["calibration"].split(batch)]
    with torch.no_grad():  # warm-up forward: kernels and allocator, as before the peer's run
        model(input_ids=batches[0]["input_ids"][:1])
    _reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    nm = ":" in pattern
    result = pk.prune(model, batches, sparsity=None if nm else float(pattern), pattern=pattern if nm else "unstructured",
                      method=method, blocks=decoder_blocks(model), progress=False,
                      stats_dtype=stats_dtype)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM") - before
    return {"seconds": seconds, "peak_growth_mib": peak, "rss_before_mib": before,
            "stats_dtype": result.stats_dtype, "batch": batch, "sparsity": _save_pruned(model, out)}


def run_llmcompressor(method: str, pattern: str, threads: int, out: str) -> dict:
    import logging

    import torch
    from torch.utils.data import DataLoader

    logging.disable(logging.WARNING)
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model, tokens = _load(threads)
    rows = [{"input_ids": r} for r in tokens["calibration"]]  # the same 32 windows, batch size 1 (its default)
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    with torch.no_grad():
        model(input_ids=tokens["calibration"][:1])
    nm = ":" in pattern
    cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    recipe = cls(sparsity=0.5, mask_structure=pattern if nm else "0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    _reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(rows), max_seq_length=SEQ_LEN)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM") - before
    import llmcompressor

    return {"seconds": seconds, "peak_growth_mib": peak, "rss_before_mib": before,
            "version": llmcompressor.__version__, "sparsity": _save_pruned(model, out)}


def evaluate(weights: str, threads: int) -> float:
    """Perplexity of the saved model with ``weights`` loaded over it (prunekit's evaluator)."""
    from safetensors.torch import load_file

    import prunekit as pk

    model, tokens = _load(threads)
    missing = set(load_file(weights)) - set(model.state_dict())
    if missing:
        raise ValueError(f"unknown weights {sorted(missing)[:3]}")
    model.load_state_dict(load_file(weights), strict=False)
    return pk.perplexity(model, tokens["eval"], seq_len=SEQ_LEN, max_sequences=EVAL_SEQUENCES)


def _child(python: str, args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if python == sys.executable:  # prunekit's run sees the checkout's sources
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    out = subprocess.run([python, os.path.abspath(__file__), *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the whole comparison -----------------------------------------------------------------------
def compare(args) -> list[dict]:
    prepare()
    tools = {"prunekit": sys.executable, "llm-compressor": args.peer_python}
    prunekit_args = ["--batch", str(args.batch)] + (["--stats-dtype", args.stats_dtype] if args.stats_dtype else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            method, pattern = run.split(":", 1)
            got: dict[str, list[dict]] = {t: [] for t in tools}
            order = list(tools)
            for repeat in range(args.repeats):
                for tool in order if repeat % 2 == 0 else order[::-1]:  # alternated, first place swapped
                    path = os.path.join(tmp, f"{tool}.safetensors")
                    extra = prunekit_args if tool == "prunekit" else []
                    r = _child(tools[tool], ["--run", tool, method, pattern, "--threads", str(args.threads),
                                             "--out", path, *extra], args.threads)
                    if repeat == 0:  # the weights are the same every repeat: score them once
                        r["perplexity"] = _child(sys.executable, ["--eval", path, "--threads", str(args.threads)],
                                                 args.threads)["perplexity"]
                    got[tool].append(r)
                    print(json.dumps({"tool": tool, "method": method, "pattern": pattern, **r}), flush=True)
            row = {"method": method, "pattern": pattern if ":" in pattern else f"{float(pattern):.0%}",
                   "calibration": f"{SEQUENCES}x{SEQ_LEN}", "threads": args.threads, "repeats": args.repeats}
            for tool, rs in got.items():
                key = "pk" if tool == "prunekit" else "llmc"
                row[f"{key}_seconds"] = round(statistics.median(r["seconds"] for r in rs), 1)
                row[f"{key}_seconds_all"] = [round(r["seconds"], 1) for r in rs]
                row[f"{key}_peak_growth_mib"] = round(statistics.median(r["peak_growth_mib"] for r in rs))
                row[f"{key}_perplexity"] = round(rs[0]["perplexity"], 2)
                row[f"{key}_sparsity"] = round(rs[0]["sparsity"], 4)
            row["llmc_version"] = got["llm-compressor"][0]["version"]
            row["pk_stats_dtype"] = got["prunekit"][0]["stats_dtype"]
            row["pk_batch"] = got["prunekit"][0]["batch"]
            row["time_ratio_pk_over_llmc"] = round(row["pk_seconds"] / row["llmc_seconds"], 2)
            row["memory_ratio_pk_over_llmc"] = round(row["pk_peak_growth_mib"] / max(row["llmc_peak_growth_mib"], 1), 2)
            rows.append(row)
    return rows


def write_markdown(rows: list[dict], path: str, note: str = "") -> None:
    version = rows[0].get("llmc_version", "?") if rows else "?"
    lines = ["# prunekit vs llm-compressor, SmolLM2-135M-Instruct on the CPU", "",
             f"`make bench-peers` (`python benchmarks/peers.py --repeats {rows[0]['repeats'] if rows else '?'}`): "
             f"llm-compressor {version} in its own venv; the same model folder, the same {SEQUENCES} x {SEQ_LEN} "
             "calibration windows, the same evaluator (prunekit.perplexity, 32 held-out windows of the pydoc text).",
             f"Each run is its own process on {rows[0]['threads'] if rows else '?'} threads; the tools alternate and the "
             "times are medians (all runs in brackets). Memory: growth of the peak resident set above the loaded "
             "model after one warm-up forward. Calibration batches: llm-compressor one window each; prunekit "
             f"{rows[0].get('pk_batch', 8) if rows else '?'} per batch, statistics in "
             f"{rows[0].get('pk_stats_dtype', '?') if rows else '?'}.", ""]
    if note:
        lines += [note, ""]
    lines += ["| method | pattern | prunekit s | llm-compressor s | time ratio | prunekit ppl | llm-compressor ppl | "
              "prunekit MiB | llm-compressor MiB | memory ratio |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['pk_seconds']} {r['pk_seconds_all']} | "
                     f"{r['llmc_seconds']} {r['llmc_seconds_all']} | {r['time_ratio_pk_over_llmc']} | "
                     f"{r['pk_perplexity']} | {r['llmc_perplexity']} | {r['pk_peak_growth_mib']} | "
                     f"{r['llmc_peak_growth_mib']} | {r['memory_ratio_pk_over_llmc']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=os.path.join(ROOT, ".venv-peers", "bin", "python"),
                   help="python of the venv holding llmcompressor (make .venv-peers)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=RUNS, help=f"comma-separated method:pattern (default {RUNS})")
    p.add_argument("--batch", type=int, default=1, help="prunekit's calibration sequences per batch (default 1, "
                   "llm-compressor's)")
    p.add_argument("--stats-dtype", choices=["float32", "float64"], default=None,
                   help="prunekit's statistics precision (default: prunekit's own)")
    p.add_argument("--note", default="", help="a line written under the table's header (e.g. how busy the machine was)")
    p.add_argument("--markdown", action="store_true", help="only rewrite peers.md from peers.json")
    p.add_argument("--run", nargs=3, metavar=("TOOL", "METHOD", "PATTERN"), help=argparse.SUPPRESS)
    p.add_argument("--eval", metavar="WEIGHTS", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        tool, method, pattern = args.run
        if tool == "prunekit":
            r = run_prunekit(method, pattern, args.threads, args.out, args.batch, args.stats_dtype)
        else:
            r = run_llmcompressor(method, pattern, args.threads, args.out)
        print(json.dumps(r), flush=True)
        return
    if args.eval:
        print(json.dumps({"perplexity": evaluate(args.eval, args.threads)}), flush=True)
        return
    json_path, md_path = os.path.join(RESULTS, "peers.json"), os.path.join(RESULTS, "peers.md")
    if args.markdown:
        data = json.load(open(json_path))
        write_markdown(data["rows"], md_path, data.get("note", ""))
        return
    if not os.path.exists(args.peer_python):
        raise SystemExit(f"{args.peer_python} does not exist; run `make .venv-peers` or pass --peer-python")
    rows = compare(args)
    os.makedirs(RESULTS, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"note": args.note, "rows": rows}, f, indent=1)
    write_markdown(rows, md_path, args.note)
    print(open(md_path).read())


if __name__ == "__main__":
    main()
