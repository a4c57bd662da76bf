"""The GPU check: prunekit's one-shot pipeline on a CUDA GPU, measured (run on a lent GPU machine).

Skips (exit 0 with a message) where no CUDA GPU is present, so CI never runs it. Sections, each
written to the results as soon as it finishes (a failing section is recorded, the rest still run):

1. ``dense``: SmolLM2-135M's held-out perplexity on the GPU (the CPU figure is 14.82).
2. ``runs``: SparseGPT and Wanda at 50% and 2:4 with the model resident on the GPU, float32
   statistics (the default on accelerators) and float64 for SparseGPT: time, peak GPU memory,
   perplexity against the CPU rows of benchmarks/results/llm.json (same 64 x 256 calibration
   sequences, same 32 held-out sequences; those ran float64 on one CPU thread).
3. ``offloaded``: the model kept in CPU memory, executed on the GPU one decoder layer at a time
   (``prune(..., device="cuda")``): time and peak GPU memory against the resident run.
4. ``layer``: SparseGPT on single SmolLM2 layers (real calibration inputs) against the reference
   algorithm (IST-DASLab/sparsegpt ``fasterprune``, re-implemented below from its published
   structure), same Hessian, same GPU: median time and layer error.
5. ``kernels``: ``pk.accelerate`` with the 2:4 semi-structured kernel on the 2:4 model in fp16,
   per MLP layer, and a larger-batch microbenchmark of the same layers.

    python benchmarks/gpu.py --out results_dir [--quick]
    python benchmarks/gpu.py --markdown results/gpu.json   # writes results/gpu.md beside it
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
CPU_ROWS = os.path.join(HERE, "results", "llm.json")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` on the GPU (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reference_sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                        blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The reference SparseGPT column sweep (Frantar & Alistarh 2023, Algorithm 1; the structure of
    IST-DASLab/sparsegpt ``SparseGPT.fasterprune``): float32, a damped inverse-Hessian Cholesky
    factor, masks chosen per block of columns by ``w^2 / [H^-1]_cc^2`` with a threshold (not an
    exact count), OBS updates column by column, lazy batch updates between blocks."""
    W = W.clone().float()
    H = H.clone().float()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    mask = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


class Results:
    """Rows appended and written to ``out/gpu.json`` as each finishes."""

    def __init__(self, out: str, header: dict) -> None:
        self.path = os.path.join(out, "gpu.json")
        self.data = {"header": header, "sections": {}}
        self.write()

    def add(self, section: str, row: dict) -> None:
        self.data["sections"].setdefault(section, []).append(row)
        print(json.dumps({section: row}), flush=True)
        self.write()

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def cpu_reference() -> dict:
    """The CPU rows of llm.json (64 x 256 calibration, all 30 layers) by (method, pattern)."""
    rows = json.load(open(CPU_ROWS))
    return {(r["method"], r["pattern"]): r for r in rows
            if r.get("layers") == 30 and r.get("calibration") == "64x256" and "perplexity" in r}


def markdown(path: str) -> str:
    """A readable table of one gpu.json, written beside it as gpu.md."""
    data = json.load(open(path))
    h, sec = data["header"], data["sections"]
    out = [f"# GPU check: {h['device']}", "",
           f"`python benchmarks/gpu.py` on {h['date']}: torch {h['torch']} (CUDA {h['cuda']}), transformers "
           f"{h['transformers']}; SmolLM2-135M, calibration {h['calibration']} pydoc tokens, perplexity on "
           f"{h['eval_sequences']} held-out sequences of 256. CPU columns: benchmarks/results/llm.json (same "
           "calibration and evaluation, float64 statistics, 1 thread).", ""]
    if "dense" in sec:
        d = sec["dense"][0]
        out += [f"Dense perplexity: {d.get('perplexity')} on the GPU, {d.get('cpu_perplexity')} on the CPU.", ""]
    rows = sec.get("runs", []) + sec.get("offloaded", [])
    if rows:
        out += ["| method | pattern | model in | runs on | statistics | seconds | peak GPU MiB | perplexity | CPU perplexity | vs CPU | CPU s (1 thread) | time vs resident |",
                "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                out.append(f"| error: {r['error']} |")
                continue
            out.append(f"| {r['method']} | {r['pattern']} | {r['model_on']} | {r['execution']} | {r['stats_dtype']} | "
                       f"{r['seconds']} | {r['peak_gpu_mib']} | {r['perplexity']} | {r.get('cpu_perplexity', '-')} | "
                       f"{100 * r['perplexity_vs_cpu']:+.1f}% | {r.get('cpu_seconds_1_thread', '-')} | "
                       f"{r.get('time_vs_resident', '-')} |" if "perplexity_vs_cpu" in r else
                       f"| {r['method']} | {r['pattern']} | {r['model_on']} | {r['execution']} | {r['stats_dtype']} | "
                       f"{r['seconds']} | {r['peak_gpu_mib']} | {r['perplexity']} | - | - | - | - |")
        out.append("")
    if sec.get("layer"):
        out += ["SparseGPT on one layer (same Hessian from the 64 x 256 calibration tokens, float32, median of 5), "
                "prunekit against the reference algorithm:", "",
                "| layer | shape | pattern | prunekit ms | reference ms | ratio | prunekit error | reference error | reference sparsity |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sec["layer"]:
            if "error" in r and isinstance(r["error"], str):
                out.append(f"| error: {r['error']} |")
                continue
            out.append(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['pattern']} | {r['prunekit_ms']} | "
                       f"{r['reference_ms']} | {r['time_ratio']} | {r['prunekit_error']:.6g} | {r['reference_error']:.6g} | "
                       f"{r['reference_sparsity']} |")
        out.append("")
    if sec.get("kernels"):
        out += ["2:4 semi-structured kernel (fp16):", ""]
        for r in sec["kernels"]:
            if r.get("what", "").startswith("pk.accelerate"):
                out.append(f"- `pk.accelerate` on the 2:4 model, 8 x 256 tokens: {r['swapped']} layers swapped, "
                           f"median MLP-layer kernel speedup {r['mlp_median_kernel_speedup']} (below 1 = slower), "
                           f"model {r['model_dense_ms']} ms dense vs {r['model_accelerated_ms']} ms after.")
            elif "speedup" in r:
                out.append(f"- `F.linear` {r['layer']} ({'x'.join(map(str, r['shape']))}), {r['tokens']} tokens: "
                           f"dense {r['dense_us']} us, 2:4 {r['semi_structured_us']} us, speedup {r['speedup']}.")
            else:
                out.append(f"- {r}")
        out.append("")
    text = "\n".join(out)
    with open(os.path.join(os.path.dirname(path), "gpu.md"), "w") as f:
        f.write(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    p.add_argument("--sections", default="dense,dense_diagnostics,runs,offloaded,layer,kernels")
    p.add_argument("--device", default="cuda", help="'cpu' with --layers for a dry run of the script itself")
    p.add_argument("--layers", type=int, default=None, help="keep only the first decoder layers (dry runs)")
    p.add_argument("--markdown", default=None, metavar="GPU_JSON", help="only write gpu.md from a gpu.json")
    args = p.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here; nothing to measure (run it on a GPU machine)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import transformers

    import prunekit as pk
    from prunekit.llm import decoder_blocks, text_calibration, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    dev = torch.device(args.device)
    header = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "cuda": torch.version.cuda,
              "calibration": f"{args.sequences}x{args.seq_len}", "eval_sequences": args.eval_sequences,
              "date": time.strftime("%Y-%m-%d")}
    res = Results(args.out, header)
    print(json.dumps(header), flush=True)
    sections = set(args.sections.split(","))

    t0 = time.perf_counter()
    tok, model = load_smollm2(num_layers=args.layers)
    res.add("load", {"seconds": round(time.perf_counter() - t0, 1)})
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib_text, eval_text = split_text(pydoc_text())
    calib = text_calibration(tok, calib_text, seq_len=args.seq_len, n_sequences=args.sequences, batch_size=8,
                             model=model)
    ids = tokenize(tok, eval_text)
    cpu = cpu_reference()

    def fresh(where: str):
        model.to("cpu")
        model.load_state_dict(pristine)
        return model.to(where)

    def ppl() -> float:
        model.to(dev)
        return round(pk.perplexity(model, ids, seq_len=args.seq_len, max_sequences=args.eval_sequences), 3)

    def section(name, fn):
        if name not in sections:
            return
        try:
            fn()
        except Exception as exc:  # recorded, and the other sections still run
            traceback.print_exc()
            res.add(name, {"error": f"{type(exc).__name__}: {exc}"[:500]})

    def dense():
        fresh(dev)
        res.add("dense", {"perplexity": ppl(), "cpu_perplexity": 14.82})

    def dense_diagnostics():
        """Why the GPU's dense perplexity differs from the CPU's: the weights (checksums against the
        CPU's -10067.611953556538 / 18618625.800991118), TF32, and the attention kernel."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fresh(dev)
        row = {"weights_sum": sum(float(p.detach().double().sum()) for p in model.parameters()),
               "weights_abs_sum": sum(float(p.detach().double().abs().sum()) for p in model.parameters()),
               "tf32_matmul_default": torch.backends.cuda.matmul.allow_tf32,
               "tf32_cudnn_default": torch.backends.cudnn.allow_tf32,
               "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        row["perplexity_tf32_off"] = ppl()
        with sdpa_kernel([SDPBackend.MATH]):
            row["perplexity_tf32_off_math_attention"] = ppl()
        model.to(torch.float64)
        with sdpa_kernel([SDPBackend.MATH]):
            row["perplexity_float64_model"] = ppl()
        model.to(torch.float32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        res.add("dense_diagnostics", row)

    resident_seconds = {}

    def run(method, pattern, stats_dtype=None, where=None, device=None, section_name="runs"):
        where = where or dev
        fresh(where)
        unstructured = ":" not in pattern
        sync()
        t = time.perf_counter()
        result = pk.prune(model, calib, sparsity=float(pattern) if unstructured else None,
                          pattern="unstructured" if unstructured else pattern, method=method,
                          blocks=decoder_blocks(model), progress=False, stats_dtype=stats_dtype, device=device)
        sync()
        seconds = time.perf_counter() - t
        row = {"method": method, "pattern": f"{float(pattern):.0%}" if unstructured else pattern,
               "model_on": str(where), "execution": result.device, "stats_dtype": result.stats_dtype,
               "seconds": round(seconds, 2),
               "peak_gpu_mib": None if result.peak_device_mib is None else round(result.peak_device_mib, 0),
               "sparsity": round(result.sparsity, 4), "perplexity": ppl()}
        ref = cpu.get((method, row["pattern"]))
        if ref and args.layers is None:
            row["cpu_perplexity"] = ref["perplexity"]
            row["cpu_seconds_1_thread"] = ref["seconds"]
            row["perplexity_vs_cpu"] = round(row["perplexity"] / ref["perplexity"] - 1, 4)
        if device is None:
            resident_seconds[(method, pattern, result.stats_dtype)] = seconds
        elif (method, pattern, result.stats_dtype) in resident_seconds:
            row["time_vs_resident"] = round(seconds / resident_seconds[(method, pattern, result.stats_dtype)], 3)
        res.add(section_name, row)

    def runs():
        grid = [("sparsegpt", "0.5", None), ("sparsegpt", "2:4", None), ("wanda", "0.5", None), ("wanda", "2:4", None),
                ("sparsegpt", "0.5", "float64"), ("sparsegpt", "2:4", "float64")]
        for method, pattern, dtype in grid[:2] if args.quick else grid:
            run(method, pattern, dtype)

    def offloaded():
        run("sparsegpt", "0.5", where="cpu", device=dev, section_name="offloaded")
        if not args.quick:
            run("wanda", "2:4", where="cpu", device=dev, section_name="offloaded")

    def layer():
        from prunekit.oneshot.solvers.sparsegpt import sparsegpt
        from prunekit.sparsity.patterns import NM, Unstructured

        fresh(dev)
        last = len(model.model.layers) - 1
        for lname in ("model.layers.0.mlp.gate_proj", f"model.layers.{min(15, last)}.mlp.down_proj",
                      f"model.layers.{min(15, last)}.self_attn.q_proj"):
            lin = model.get_submodule(lname)
            xs = []
            h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
            with torch.no_grad():
                for b in calib:
                    model(**{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()})
            h.remove()
            X = torch.cat(xs)
            H = X.T @ X / X.shape[0]
            W = lin.weight.detach().float()
            for pattern in ("0.5", "2:4"):
                nm = ":" in pattern
                pat = NM(2, 4) if nm else Unstructured()
                ours = lambda: sparsegpt(W, H, 0.5, pat, dtype=torch.float32)
                ref = lambda: reference_sparsegpt(W, H, 0.5, prunen=2 if nm else 0, prunem=4 if nm else 0)
                t_ours, t_ref = cuda_time(ours), cuda_time(ref)
                w_ours, w_ref = ours().weight, ref()

                def err(w):
                    d = (w - W).double()
                    return float(((d @ H.double()) * d).sum() / W.shape[0])

                res.add("layer", {"layer": lname, "shape": list(W.shape), "pattern": pattern, "tokens": X.shape[0],
                                  "prunekit_ms": round(1e3 * t_ours, 2), "reference_ms": round(1e3 * t_ref, 2),
                                  "time_ratio": round(t_ours / t_ref, 3),
                                  "prunekit_sparsity": round(float((w_ours == 0).float().mean()), 5),
                                  "reference_sparsity": round(float((w_ref == 0).float().mean()), 5),
                                  "prunekit_error": err(w_ours), "reference_error": err(w_ref)})

    def kernels():
        import torch.nn.functional as F
        from torch.sparse import to_sparse_semi_structured

        fresh(dev)
        pk.prune(model, calib, pattern="2:4", method="sparsegpt", blocks=decoder_blocks(model), progress=False)
        if dev.type == "cpu":
            return
        model.half()
        example = {"input_ids": ids[: 8 * args.seq_len].view(8, args.seq_len).to(dev)}
        rep = pk.accelerate(model.eval(), example, kernels=("semi_structured",), rtol=1e-2, atol=1e-2)
        mlp = [r for r in rep.layers if ".mlp." in r.name]
        res.add("kernels", {"what": "pk.accelerate, 8x256 tokens, fp16",
                            "model_dense_ms": round(rep.model_dense_ms, 3),
                            "model_accelerated_ms": round(rep.model_accelerated_ms, 3),
                            "reverted": rep.reverted, "swapped": len(rep.swapped),
                            "mlp_layers": len(mlp),
                            "mlp_median_kernel_speedup": round(statistics.median(
                                [r.dense_ms / r.kernels_ms["semi_structured"] for r in mlp
                                 if isinstance(r.kernels_ms.get("semi_structured"), float)] or [math.nan]), 3),
                            "mlp_kernel_notes": sorted({str(r.kernels_ms.get("semi_structured"))[:80] for r in mlp
                                                        if not isinstance(r.kernels_ms.get("semi_structured"), float)})})
        rep.undo()
        for tokens in (2048, 16384):
            for lname in ("model.layers.15.mlp.gate_proj", "model.layers.15.mlp.down_proj"):
                w = model.get_submodule(lname).weight.detach()
                x = torch.randn(tokens, w.shape[1], device=dev, dtype=w.dtype)
                ws = to_sparse_semi_structured(w)
                t_dense = cuda_time(lambda: F.linear(x, w), repeats=20, warmup=3)
                t_sparse = cuda_time(lambda: F.linear(x, ws), repeats=20, warmup=3)
                res.add("kernels", {"what": "F.linear fp16 microbenchmark", "layer": lname, "shape": list(w.shape),
                                    "tokens": tokens, "dense_us": round(1e6 * t_dense, 1),
                                    "semi_structured_us": round(1e6 * t_sparse, 1),
                                    "speedup": round(t_dense / t_sparse, 3)})

    section("dense", dense)
    section("dense_diagnostics", dense_diagnostics)
    section("runs", runs)
    section("offloaded", offloaded)
    section("layer", layer)
    section("kernels", kernels)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
