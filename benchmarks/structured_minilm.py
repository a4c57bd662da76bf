"""Structured one-shot pruning of all-MiniLM-L6-v2: embedding fidelity and encode speed vs dense.

Units of every encoder layer are removed (``--params``: that fraction of the encoder layers'
parameters, by the closest uniform ratio; ``--ratio``: that fraction of each layer's units), the rest repaired;
embeddings are the model's mean-pooled, normalised last hidden states (sentence-transformers'
pooling). On held-out pydoc paragraphs (calibration: the head of the text, disjoint):
- fidelity: mean cosine between the pruned and dense embedding of each paragraph;
- rank agreement: for every paragraph, the overlap of its 10 nearest neighbours (by cosine)
  under the pruned and the dense model, averaged;
- encode speed: 64 paragraphs x 128 tokens per call, medians of repeats, pruned runs alternated
  with dense ones in this process, as a ratio to dense (> 1 is faster).

    python benchmarks/structured_minilm.py                      # 20% and 30% of encoder parameters
    python benchmarks/structured_minilm.py --params --ratio 0.2 0.3    # 20% and 30% of MLP neurons
    python benchmarks/structured_minilm.py --params 0.2 --refine snows --snows '{"k": 2, "max_cg": 5}'  # SNOWS
Results: benchmarks/results/structured_minilm.json (rows merged by their settings) and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _batches(tok, text: str, n: int, length: int, batch: int) -> list[dict]:
    paragraphs = [p for p in text.split("\n\n") if len(p.split()) >= 20][:n]
    enc = tok(paragraphs, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return [{"input_ids": i, "attention_mask": m} for i, m in
            zip(enc["input_ids"].split(batch), enc["attention_mask"].split(batch))]


@torch.no_grad()
def embed(model, batches: list[dict]) -> torch.Tensor:
    out = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def _seconds(model, batch: dict, repeats: int) -> float:
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(path: Path) -> None:
    """Write the .md table from the JSON rows."""
    rows = json.loads(path.read_text())
    lines = ["# Structured one-shot pruning of all-MiniLM-L6-v2 (CPU)", "",
             "`python benchmarks/structured_minilm.py`. Units removed uniformly in every layer; calibration 256 pydoc "
             "paragraphs x 128 tokens, evaluation 256 held-out paragraphs. Cosine: pruned vs dense embedding of the "
             "same paragraph; top-10 overlap: nearest neighbours kept; speed: 64 x 128 tokens per call, ratio to "
             "dense in the same process (> 1 faster); load: the machine's 1-minute load average when the row was "
             "measured (2 cores: above 2, speed and prune seconds are only indicative).", "",
             "| structures | target | method | refine | intermediate | heads | encoder params removed "
             "| model params removed | cosine mean | cosine min | top-10 overlap | encode speed vs dense | prune s | load |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = f"{'params' if r['target'] == 'params' else 'units'} {r['amount']:.0%}"
        enc = f"{r['encoder_params_removed']:.1%}" if "encoder_params_removed" in r else "-"
        lines.append(f"| {r['structures']} | {target} | {r['method']} | {r['refine']} | {r['intermediate']} | "
                     f"{r.get('heads', 12)} | {enc} | "
                     f"{r['params_removed']:.1%} | {r['cosine_mean']} | {r['cosine_min']} | {r['top10_overlap']} | "
                     f"{r['encode_speed_vs_dense']} | {r['prune_seconds']} | {r.get('load_average', '-')} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    import prunekit as pk
    from prunekit.zoo.minilm import load_minilm
    from prunekit.zoo.text import pydoc_text, split_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="*", default=[0.2, 0.3],
                   help="fractions of the encoder layers' parameters to remove")
    p.add_argument("--ratio", type=float, nargs="*", default=[], help="fractions of every structure's units instead")
    p.add_argument("--structures", default="mlp")
    p.add_argument("--method", nargs="+", default=["wanda"])
    p.add_argument("--refine", nargs="+", default=["none", "lstsq"])
    p.add_argument("--snows", type=json.loads, default=None, metavar="JSON",
                   help='SNOWS options for --refine snows, e.g. \'{"k": 2, "max_cg": 5}\' (default: its defaults)')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "structured_minilm.json")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the JSON")
    args = p.parse_args(argv)
    if args.report_only:
        report(args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    tok, model = load_minilm()
    calib_text, eval_text = split_text(pydoc_text())
    calibration = _batches(tok, calib_text, 256, 128, 32)
    held_out = _batches(tok, eval_text, 256, 128, 32)
    dense = embed(model, held_out)
    dense_nn = (dense @ dense.T).fill_diagonal_(-2).topk(10).indices
    speed_batch = {k: torch.cat([b[k] for b in held_out[:2]]) for k in held_out[0]}  # 64 x 128
    rows = []
    encoder = lambda m: sum(p.numel() for p in m.encoder.parameters())  # noqa: E731
    targets = [("params", v) for v in args.params or []] + [("ratio", v) for v in args.ratio or []]
    for target, amount in targets:
        for method in args.method:
            for refine in args.refine:
                pruned = copy.deepcopy(model)
                t0 = time.perf_counter()
                result = pk.prune_structured(pruned, calibration, structures=args.structures, **{target: amount},
                                             method=method, refine=refine, progress=False,
                                             refine_options=args.snows if refine == "snows" else None)
                seconds = time.perf_counter() - t0
                emb = embed(pruned, held_out)
                nn_ = (emb @ emb.T).fill_diagonal_(-2).topk(10).indices
                overlap = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(nn_, dense_nn))
                ratios = []
                for _ in range(2):  # alternated, so drift hits both
                    d = _seconds(model, speed_batch, args.repeats)
                    q = _seconds(pruned, speed_batch, args.repeats)
                    ratios.append(d / q)
                row = {"structures": args.structures, "target": target, "amount": amount, "method": method,
                       "refine": refine if refine != "snows" or not args.snows else f"snows {json.dumps(args.snows)}", "intermediate": pruned.config.intermediate_size,
                       "heads": [layer.attention.self.num_attention_heads for layer in pruned.encoder.layer][0],
                       "encoder_params_removed": round(1 - encoder(pruned) / encoder(model), 4),
                       "params_removed": round(result.removed_fraction, 4),
                       "cosine_mean": round(float((emb * dense).sum(1).mean()), 4),
                       "cosine_min": round(float((emb * dense).sum(1).min()), 4),
                       "top10_overlap": round(overlap, 3), "encode_speed_vs_dense": round(statistics.mean(ratios), 3),
                       "prune_seconds": round(seconds, 1), "threads": args.threads,
                       "load_average": round(os.getloadavg()[0], 2), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    for r in old:  # rows written before targets existed were ratios of MLP neurons
        r.setdefault("structures", "mlp"), r.setdefault("target", "ratio"), r.setdefault("amount", r.pop("ratio", None))
    key = lambda r: (r["structures"], r["target"], r["amount"], r["method"], r["refine"])  # noqa: E731
    rows = sorted({key(r): r for r in old + rows}.values(), key=lambda r: (r["structures"], r["target"], r["amount"]))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    report(args.out)


if __name__ == "__main__":
    main()
