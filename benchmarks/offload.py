"""SmolLM2-135M pruned in memory against the same model dispatched with accelerate's offload.

SparseGPT at 50%, 32 x 256 calibration sequences from the pydoc text (8 batches of 4), the same
thread count in every run. Three configurations:

* ``memory``: the model as loaded, in CPU memory;
* ``cpu_offload``: ``accelerate.cpu_offload`` (weights on the meta device, one CPU state dict
  read by the hooks before each forward);
* ``disk_offload``: ``accelerate.disk_offload`` into a temporary folder (weights in ``.dat``
  memory maps, read before each forward).

``prune()`` loads one decoder layer at a time from the offload storage, keeps it loaded for all of
that layer's forwards and writes the pruned weights back (:mod:`prunekit.oneshot.runtime.offload`). Each
run is a fresh interpreter; the configurations are alternated over ``--rounds`` (the order rotates
every round) and the medians are reported:

* ``prune_s``: ``prune()``'s wall time;
* ``peak_growth_mib``: peak resident memory during ``prune()`` above the resident memory of the
  loaded (for the offloaded runs: dispatched) model just before it, read as ``VmHWM`` minus
  ``VmRSS`` from /proc/self/status after resetting ``VmHWM`` (:func:`prunekit.zoo.memory.reset_peak`);
* ``peak_anon_growth_mib``: the same for ``RssAnon`` alone, sampled every 10 ms from a thread: the
  memory the process allocated, without the memory maps' file-backed pages (which the kernel can
  drop at any time) that ``VmHWM`` counts while a ``.dat`` file is mapped;
* ``perplexity`` of the pruned model on the held-out pydoc text (``--eval-sequences`` x 256 tokens);
* ``weights_sha256``: a checksum of every pruned weight as the model keeps it (an offloaded one read
  from its offload storage): the offloaded runs must equal the in-memory one bit for bit.

    python benchmarks/offload.py --rounds 2                 # writes results/offload.json and .md
    python benchmarks/offload.py --rounds 1 --layers 2      # a quick look
    python benchmarks/offload.py --markdown                 # rewrite the .md from the .json
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIGS = ("memory", "cpu_offload", "disk_offload")


def _checksum(model, names) -> str:
    """sha256 over the pruned weights as stored (in the module, or in its offload storage)."""
    from prunekit.oneshot.runtime.offload import Storage

    storage = Storage(model, {n: model.get_submodule(n) for n in names})
    digest = hashlib.sha256()
    for path in sorted(storage.params):
        digest.update(path.encode())
        digest.update(storage.read(path).detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class _Timers:
    """Seconds spent in the offload machinery during ``prune()``, by wrapping its entry points:
    ``hooks`` (accelerate's pre/post-forward: loading weights from the offload storage, moving
    inputs), ``read`` (a weight read from the offload storage: the ``.dat`` memory maps, or the CPU
    state dict), ``write_back`` (pruned weights written to the storage) and ``restore`` (originals
    saved to the on-disk restore point, in every configuration). ``offload`` counts the outermost
    of the first three only, so nested calls are not counted twice."""

    def __init__(self) -> None:
        self.seconds = {"hooks": 0.0, "read": 0.0, "write_back": 0.0, "restore": 0.0, "offload": 0.0}
        self.depth = 0
        self.on = False

    def wrap(self, owner, attr: str, key: str) -> None:
        real = getattr(owner, attr)

        def timed(*args, **kwargs):
            if not self.on:
                return real(*args, **kwargs)
            outer = key != "restore" and self.depth == 0
            self.depth += key != "restore"
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.depth -= key != "restore"
                self.seconds[key] += spent
                if outer:
                    self.seconds["offload"] += spent

        setattr(owner, attr, timed)


def _timers() -> _Timers:
    import accelerate.hooks
    import accelerate.utils.offload

    import prunekit.oneshot.runtime.offload as offload
    import prunekit.oneshot.runtime.restore as restore

    timers = _Timers()
    timers.wrap(accelerate.hooks.AlignDevicesHook, "pre_forward", "hooks")
    timers.wrap(accelerate.hooks.AlignDevicesHook, "post_forward", "hooks")
    timers.wrap(offload.Storage, "read", "read")
    timers.wrap(offload, "store", "write_back")
    timers.wrap(restore.RestorePoint, "save", "restore")
    return timers


class _AnonSampler:
    """Peak anonymous resident memory (``RssAnon``: the process's own allocations, without the
    file-backed pages of the ``.dat`` memory maps that ``VmHWM`` also counts), sampled every
    ``interval`` seconds from a thread; growth above the value when started."""

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        from prunekit.zoo.memory import resident_mib

        self.read = lambda: resident_mib("RssAnon")
        self.base = self.peak = self.read()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self.thread.start()

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self.peak = max(self.peak, self.read())

    def growth(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.read()) - self.base


def _worker(config: str, layers: int | None, threads: int, eval_sequences: int, out: str) -> None:
    """One run: load, dispatch as ``config`` says, prune, checksum, evaluate; the row to ``out``."""
    import accelerate

    import prunekit as pk
    from prunekit.llm import decoder_blocks, text_calibration, tokenize
    from prunekit.zoo.memory import reset_peak, resident_mib
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(threads)
    timers = _timers()
    tok, model = load_smollm2(num_layers=layers)
    calib_text, eval_text = split_text(pydoc_text())
    batches = text_calibration(tok, calib_text, seq_len=256, n_sequences=32, batch_size=4, model=model)
    ids = tokenize(tok, eval_text)
    with torch.no_grad():  # warm up kernels and the allocator once, as any forward would
        model(**batches[0])
    folder = tempfile.mkdtemp(prefix="offbench-")
    try:
        if config == "cpu_offload":
            model = accelerate.cpu_offload(model, execution_device="cpu")
        elif config == "disk_offload":
            model = accelerate.disk_offload(model, folder, execution_device="cpu")
        gc.collect()
        reset_peak()
        before = resident_mib("VmRSS")
        timers.on = True
        anon = _AnonSampler()
        start = time.perf_counter()
        result = pk.prune(model, batches, sparsity=0.5, method="sparsegpt", blocks=decoder_blocks(model),
                          progress=False)
        wall = time.perf_counter() - start
        timers.on = False
        anon_growth = anon.growth()
        growth = resident_mib("VmHWM") - before
        names = [r.name for r in result.layers]
        row = {"config": config, "prune_s": wall, "result_s": result.seconds,
               "solve_s": sum(r.seconds for r in result.layers), "peak_growth_mib": growth, "peak_anon_growth_mib": anon_growth,
               "rss_before_mib": before, "sparsity": result.sparsity, "pruned_layers": len(names),
               "layers": len(model.model.layers), "threads": threads, "weights_sha256": _checksum(model, names),
               **{f"{k}_s": v for k, v in timers.seconds.items()}}
        t0 = time.perf_counter()
        row["perplexity"] = pk.perplexity(model, ids, seq_len=256, max_sequences=eval_sequences)
        row["eval_s"] = time.perf_counter() - t0
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    with open(out, "w") as f:
        json.dump(row, f)


def run_config(config: str, args) -> dict:
    """One configuration in a fresh interpreter (so neither memory nor caches are shared)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--out", out,
               "--threads", str(args.threads), "--eval-sequences", str(args.eval_sequences)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        row = json.load(open(out))
        row["process_wall_s"] = time.perf_counter() - start
        return row


def _med_or_dash(rows: list[dict], config: str, key: str) -> str:
    values = [r[key] for r in rows if r["config"] == config and key in r]
    return f"{statistics.median(values):.0f}" if values else "-"


def markdown(rows: list[dict], meta: dict) -> str:
    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["config"] == config)

    base = med("memory", "prune_s")
    sums = {r["weights_sha256"] for r in rows}
    lines = ["# Offloaded against in-memory one-shot pruning (SmolLM2-135M, SparseGPT 50%)", "",
             f"Command: `{meta['command']}`", "", meta["machine"], "",
             f"{meta['layers']} decoder layers, 32 x 256 calibration sequences (8 batches of 4), float64 statistics, "
             f"{meta['threads']} threads, CPU execution; {meta['rounds']} rounds, configurations rotated, each run a "
             "fresh process; medians. Peak growth: `VmHWM` minus `VmRSS` during `prune()`, above the loaded "
             "(offloaded runs: dispatched) model, after resetting `VmHWM`. Perplexity on "
             f"{meta['eval_sequences']} x 256 held-out pydoc tokens.", "",
             "| configuration | prune() s | x in-memory | peak growth MiB (VmHWM) | peak anon growth MiB (sampled) "
             "| RSS before MiB | perplexity | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for c in CONFIGS:
        n = sum(r["config"] == c for r in rows)
        if not n:
            continue
        lines.append(f"| {c} | {med(c, 'prune_s'):.1f} | x{med(c, 'prune_s') / base:.2f} | "
                     f"{med(c, 'peak_growth_mib'):.0f} | {_med_or_dash(rows, c, 'peak_anon_growth_mib')} | "
                     f"{med(c, 'rss_before_mib'):.0f} | "
                     f"{med(c, 'perplexity'):.2f} | {n} |")
    lines += ["", "Where the offloaded runs spend time on the offload itself (medians, seconds inside `prune()`; "
              "wrapped entry points: accelerate's pre/post-forward hooks, which load weights from the storage; "
              "reads of a stored weight; the write-back of pruned weights; the restore point's disk writes, "
              "which every configuration does). `offload` counts nested calls once; its share of `prune()` "
              "is the machine-independent estimate of the offload's cost, since the rest is the same work in "
              "every configuration.", "",
              "| configuration | hooks | reads | write-back | offload total | share of prune() | restore point |",
              "|---|---|---|---|---|---|---|"]
    for c in CONFIGS:
        if any(r["config"] == c for r in rows):
            share = statistics.median(r["offload_s"] / r["prune_s"] for r in rows if r["config"] == c)
            lines.append(f"| {c} | {med(c, 'hooks_s'):.2f} | {med(c, 'read_s'):.2f} | {med(c, 'write_back_s'):.2f} | "
                         f"{med(c, 'offload_s'):.2f} | {share:.1%} | {med(c, 'restore_s'):.2f} |")
    lines += ["", "Pruned weights identical in every run (sha256 of the stored weights): "
              + ("yes" if len(sums) == 1 else f"NO ({len(sums)} distinct checksums)") + ".", "",
              "Every run, in order:", "",
              "| round | configuration | prune() s | per-layer solves s | peak growth MiB | perplexity |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['config']} | {r['prune_s']:.1f} | {r['solve_s']:.1f} | "
                     f"{r['peak_growth_mib']:.0f} | {r['perplexity']:.2f} |")
    if meta.get("notes"):
        lines += ["", *meta["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first decoder layers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-sequences", type=int, default=8, help="held-out sequences for the perplexity")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--machine", default="", help="a note on the machine (e.g. shared, contended)")
    parser.add_argument("--markdown", action="store_true", help="rewrite offload.md from offload.json")
    parser.add_argument("--worker", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.layers, args.threads, args.eval_sequences, args.out)
        return
    if args.markdown:
        saved = json.load(open(os.path.join(RESULTS, "offload.json")))
        with open(os.path.join(RESULTS, "offload.md"), "w") as f:
            f.write(markdown(saved["runs"], saved["meta"]))
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    rows = []
    for i in range(args.rounds):
        shift = i % len(configs)
        for config in configs[shift:] + configs[:shift]:
            row = run_config(config, args)
            row["round"] = i + 1
            rows.append(row)
            print(json.dumps(row), flush=True)
    sums = {r["weights_sha256"] for r in rows}
    meta = {"command": shlex.join(["python", "benchmarks/offload.py", *sys.argv[1:]]), "rounds": args.rounds,
            "layers": rows[0]["layers"], "threads": args.threads, "eval_sequences": args.eval_sequences,
            "machine": args.machine, "cpus": os.cpu_count(), "weights_identical": len(sums) == 1}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "offload.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "offload.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    if len(sums) != 1:
        sys.exit(f"the pruned weights differ between runs: {len(sums)} distinct checksums")


if __name__ == "__main__":
    main()
