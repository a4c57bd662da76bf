"""Structured one-shot pruning of SmolLM2-135M: perplexity and measured CPU speed vs the dense model.

Every run removes a fraction of the decoder layers' parameters (``params=``) with one method
(which units go) and one refine (how the rest is repaired), then measures, in this same process and with the same threads:
- perplexity on the held-out tail of the pydoc text (calibration: its head, disjoint);
- prefill tokens/s (one forward of ``batch x 256`` tokens) and decode tokens/s (greedy
  generation of 32 tokens after a 32-token prompt, KV cache on) at batch 1 and 8, as medians of
  repeats, each pruned measurement alternated with a dense one, reported as ratios to dense.

    python benchmarks/structured_llm.py                       # the grid below
    python benchmarks/structured_llm.py --params 0.2 --method obs --refine lstsq
    python benchmarks/structured_llm.py --ratio 0.3 --method wanda --refine lstsq --damp 1e-6   # the plain baseline
    python benchmarks/structured_llm.py --params 0.2 --method wanda --refine snows --snows '{"k": 2, "max_cg": 3}'
FLOPs: the linear layers' (``prunekit.model_report``) plus the attention products (``4 S^2 d_head``
per head and layer) of one forward of 1 x 256 tokens; the fraction removed is of the whole model's.
Results: benchmarks/results/structured_llm.json (one row per run, appended), .md and .png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speeds(model, vocab: int, repeats: int) -> dict[str, float]:
    """Tokens per second: prefill (batch x 256) and decode (32 new tokens) at batch 1 and 8."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in (1, 8):
        x = torch.randint(0, vocab, (batch, 256), generator=g)
        out[f"prefill_b{batch}"] = batch * 256 / _timed(lambda: model(input_ids=x, use_cache=False), repeats)
        prompt = torch.randint(0, vocab, (batch, 32), generator=g)
        gen = lambda: model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,  # noqa: E731
                                     pad_token_id=0)
        out[f"decode_b{batch}"] = batch * 32 / _timed(gen, repeats)
    return out


def decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def forward_flops(model, seq: int = 256) -> int:
    """FLOPs of one forward of ``1 x seq`` tokens: every linear layer (lm_head included) plus the
    attention products ``Q K^T`` and ``A V`` (``2 * 2 * seq^2 * head_dim`` per head and layer)."""
    import prunekit as pk

    x = torch.zeros(1, seq, dtype=torch.long)
    linear = pk.model_report(model, {"input_ids": x, "use_cache": False}).flops_dense
    heads = sum(layer.self_attn.q_proj.out_features for layer in model.model.layers)  # = heads x head_dim
    return linear + 4 * seq * seq * heads


def run(args) -> list[dict]:
    import prunekit as pk
    from prunekit.llm import text_calibration, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(args.threads)
    tok, model = load_smollm2()
    model.generation_config.pad_token_id = 0
    calib_text, eval_text = split_text(pydoc_text())
    ids = tokenize(tok, eval_text)
    calibration = text_calibration(tok, calib_text, seq_len=256, n_sequences=args.sequences, batch_size=8)
    dense_ppl = pk.perplexity(model, ids, seq_len=256, max_sequences=args.eval_sequences)
    rows = []
    shapes: dict[tuple, dict] = {}  # speed depends on the shapes alone: measured once per shape
    dense_dec, dense_flops = decoder_params(model), forward_flops(model)
    print(f"dense perplexity {dense_ppl:.2f}, decoder parameters {dense_dec:,}", flush=True)
    targets = [("params", p) for p in args.params or []] + [("ratio", r) for r in args.ratio or []]
    for target, amount in targets:
        params = amount if target == "params" else None
        for method in args.method:
            for refine in args.refine:
                pruned = copy.deepcopy(model)
                t0 = time.perf_counter()
                bias = True if refine == "bias" else args.bias  # FLAP's compensation needs a bias to write
                result = pk.prune_structured(pruned, calibration, structures=args.structures, **{target: amount},
                                             method=method, refine=refine, bias=bias, damp=args.damp, budget=args.budget,
                                             multiple_of=args.multiple_of, progress=False,
                                             refine_options=args.snows if refine == "snows" else None)
                seconds = time.perf_counter() - t0
                ppl = pk.perplexity(pruned, ids, seq_len=256, max_sequences=args.eval_sequences)
                shape = (pruned.config.intermediate_size, pruned.config.num_attention_heads,
                         pruned.config.num_hidden_layers)
                if args.skip_speed:
                    shapes.setdefault(shape, {"ratio": None, "dense": None})
                if shape not in shapes:
                    # dense and pruned alternated, so drift in the machine's speed hits both alike
                    d1, p1 = speeds(model, tok.vocab_size, args.repeats), speeds(pruned, tok.vocab_size, args.repeats)
                    d2, p2 = speeds(model, tok.vocab_size, args.repeats), speeds(pruned, tok.vocab_size, args.repeats)
                    shapes[shape] = {"ratio": {k: round(statistics.mean([p1[k] / d1[k], p2[k] / d2[k]]), 3)
                                               for k in d1}, "dense": d1}
                ratio, d1 = shapes[shape]["ratio"], shapes[shape]["dense"]
                label = f"snows {json.dumps(args.snows, sort_keys=True)}" if refine == "snows" and args.snows else str(refine)
                row = {"structures": args.structures, "params_target": params, "method": method, "refine": label,
                       "ratio": amount if target == "ratio" else None, "damp": args.damp, "budget": args.budget,
                       "bias": str(bias), "multiple_of": args.multiple_of, "calibration": f"{args.sequences}x256",
                       "decoder_params_removed": round(1 - decoder_params(pruned) / dense_dec, 4),
                       "flops_removed": round(1 - forward_flops(pruned) / dense_flops, 4),
                       "model_params_removed": round(result.removed_fraction, 4),
                       "intermediate_size": pruned.model.layers[0].mlp.down_proj.in_features,
                       "widths": [layer.mlp.down_proj.in_features for layer in pruned.model.layers],
                       "heads": pruned.config.num_attention_heads,
                       "perplexity": round(ppl, 2), "dense_perplexity": round(dense_ppl, 2),
                       "x_dense": round(ppl / dense_ppl, 3), "prune_seconds": round(seconds, 1),
                       "speed_vs_dense": ratio,
                       "dense_tokens_per_s": None if d1 is None else {k: round(v, 1) for k, v in d1.items()},
                       "load_average": round(os.getloadavg()[0], 2),
                       "threads": args.threads, "torch": torch.__version__,
                       "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
                print(json.dumps(row), flush=True)
                rows.append(row)
                del pruned
    return rows


def write(rows: list[dict], path: Path) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["structures"], r["params_target"], r.get("ratio"), r.get("damp", 0.1), r.get("budget", "uniform"),  # noqa: E731
                     r["method"],
                     r["refine"], r["bias"], r["calibration"], r.get("multiple_of", 1))
    merged = {key(r): r for r in old + rows}
    # speed depends on the shapes alone: every row of a shape shows the newest measurement of it
    # a global budget's widths differ per layer: its rows never share a uniform row's shape
    shape = lambda r: (r["intermediate_size"], r["heads"], r.get("layers"), r.get("budget", "uniform"),  # noqa: E731
                       r["decoder_params_removed"] if r.get("budget", "uniform") != "uniform" else None)
    newest = {shape(r): r for r in sorted(merged.values(), key=lambda r: r.get("measured", ""))
              if r.get("speed_vs_dense") is not None}
    flops = {shape(r): r["flops_removed"] for r in merged.values() if "flops_removed" in r}
    for r in merged.values():
        if shape(r) in newest:
            r["speed_vs_dense"] = newest[shape(r)]["speed_vs_dense"]
            r["dense_tokens_per_s"] = newest[shape(r)]["dense_tokens_per_s"]
        if shape(r) in flops:  # FLOPs, like speed, follow from the shapes alone
            r["flops_removed"] = flops[shape(r)]
    path.write_text(json.dumps(list(merged.values()), indent=1) + "\n")


def report(path: Path) -> None:
    rows = json.loads(path.read_text())
    rows.sort(key=lambda r: (r["structures"], r["decoder_params_removed"], r["x_dense"]))
    lines = ["# Structured one-shot pruning of SmolLM2-135M-Instruct (CPU)", "",
             "`python benchmarks/structured_llm.py` (`make bench-structured-llm`). Perplexity: held-out tail of the "
             "pydoc text, 32 x 256 tokens; calibration its head. Speed: this process, same threads, medians of "
             "repeats, pruned runs alternated with dense ones; ratio > 1 is faster than dense.", "",
             "| structures | target | decoder params removed | FLOPs removed | method | refine | damp | bias | multiple of | intermediate "
             "| heads | perplexity | x dense | prefill b1 | prefill b8 | decode b1 | decode b8 | prune s |",
             "|---|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["speed_vs_dense"] or {k: "-" for k in ("prefill_b1", "prefill_b8", "decode_b1", "decode_b8")}
        target = f"params {r['params_target']:.0%}" if r["params_target"] is not None else f"units {r['ratio']:.0%}"
        flops = f"{r['flops_removed']:.1%}" if "flops_removed" in r else "-"
        lines.append(f"| {r['structures']} | {target} | {r['decoder_params_removed']:.1%} | {flops} | {r['method']} "
                     f"| {r['refine']}{'' if r.get('budget', 'uniform') == 'uniform' else ' (' + r['budget'] + ')'} "
                     f"| {r.get('damp', 0.1):g} | {r['bias']} | {r.get('multiple_of', 1)} | {r['intermediate_size']} | {r['heads']} "
                     f"| {r['perplexity']} "
                     f"| {r['x_dense']} | {s['prefill_b1']} | {s['prefill_b8']} | {s['decode_b1']} | {s['decode_b8']} "
                     f"| {r['prune_seconds']} |")
    if rows:
        d = next((r for r in rows if r.get("dense_tokens_per_s")), rows[0])
        lines += ["", f"Dense: perplexity {d['dense_perplexity']}, tokens/s {d['dense_tokens_per_s']} "
                      f"({d['threads']} threads, torch {d['torch']})."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, path.with_suffix(".png"))


def _plot(rows: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list] = {}
    for r in rows:
        damp = "" if r.get("damp", 0.1) == 0.1 else f" damp {r['damp']:g}"
        damp += "" if r.get("budget", "uniform") == "uniform" else f" {r['budget']}"
        series.setdefault(f"{r['structures']} {r['method']}+{r['refine']}{damp}", []).append(
            (r["decoder_params_removed"], r["x_dense"]))
    off = []
    for n, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        shown = [(p, y) for p, y in pts if y <= 2.5]
        off += [label] if len(shown) < len(pts) else []
        if shown:
            ax.plot([100 * p for p, _ in shown], [y for _, y in shown], marker="o", label=label,
                    ls="-" if n < 10 else "--")
    ax.axhline(1.2, ls=":", c="grey")
    ax.axhline(1.5, ls=":", c="grey")
    ax.set_ylim(1.0, 2.5)
    ax.set_xlabel("decoder parameters removed (%)")
    ax.set_ylabel("perplexity / dense")
    ax.legend(fontsize=6, loc="upper left")
    if off:  # runs that collapsed would flatten the rest of the chart: the table has their figures
        ax.set_title("above x2.5, see the table: " + ", ".join(off), fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="*", default=[0.1, 0.2, 0.3],
                   help="fractions of the decoder parameters to remove (the closest uniform ratio)")
    p.add_argument("--ratio", type=float, nargs="*", default=[], help="fractions of every structure's units instead")
    p.add_argument("--budget", default="uniform", choices=("uniform", "global"),
                   help="global: units ranked across layers (per-layer widths; intermediate shows layer 0's)")
    p.add_argument("--damp", type=float, default=0.1, help="the least-squares refit's ridge towards the dense columns")
    p.add_argument("--method", nargs="+", default=["magnitude", "wanda", "flap", "obs"])
    p.add_argument("--refine", nargs="+", default=["none", "bias", "lstsq"])
    p.add_argument("--snows", type=json.loads, default=None, metavar="JSON",
                   help='SNOWS options for --refine snows, e.g. \'{"k": 2, "max_cg": 3}\' (default: its defaults)')
    p.add_argument("--structures", default="mlp")
    p.add_argument("--multiple-of", type=int, default=1, help="round kept MLP widths to a multiple of this")
    p.add_argument("--bias", default="auto", type=lambda v: {"true": True, "false": False}.get(v.lower(), v))
    p.add_argument("--sequences", type=int, default=32, help="calibration sequences of 256 tokens")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-speed", action="store_true",
                   help="measure perplexity only (a busy machine); rows take the speed measured for their shape")
    p.add_argument("--out", type=Path, default=RESULTS / "structured_llm.json")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the JSON")
    args = p.parse_args(argv)
    if not args.report_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        write(run(args), args.out)
    report(args.out)


if __name__ == "__main__":
    sys.exit(main())
