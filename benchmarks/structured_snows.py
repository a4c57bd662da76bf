"""refine=None / "lstsq" / "snows" for MLP neurons of SmolLM2-135M cut to its first decoder layers.

For each ratio of every MLP's neurons removed (method="wanda"), prunes a copy of the model and
measures, on the held-out tail of the pydoc text (calibration: its head, disjoint):

- perplexity of the truncated model (a 4-layer SmolLM2 is a poor LM; what matters is the ratio
  to its own dense perplexity, measured in the same process);
- the relative error of the final hidden states, ||h - h_dense||^2 / ||h_dense||^2;
- the wall time of prune_structured.

Usage: ``python benchmarks/structured_snows.py [--layers 4] [--ratios 0.2 0.3]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@torch.no_grad()
def hidden_error(model, dense, ids: torch.Tensor, seq_len: int, n: int) -> float:
    num = den = 0.0
    for i in range(n):
        x = ids[i * seq_len:(i + 1) * seq_len][None]
        h, d = model.model(input_ids=x).last_hidden_state, dense.model(input_ids=x).last_hidden_state
        num += float(((h - d) ** 2).sum())
        den += float((d ** 2).sum())
    return num / den


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="calibration batch size (SNOWS: one Newton step a batch)")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-cg", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import prunekit as pk
    from prunekit.llm import text_calibration, tokenize
    from prunekit.zoo.smollm2 import load_smollm2
    from prunekit.zoo.text import pydoc_text, split_text

    torch.set_num_threads(args.threads)
    tok, dense = load_smollm2(num_layers=args.layers)
    calib_text, eval_text = split_text(pydoc_text())
    ids = tokenize(tok, eval_text)
    calibration = text_calibration(tok, calib_text, seq_len=args.seq_len, n_sequences=args.sequences,
                                   batch_size=args.batch)
    ppl = lambda m: pk.perplexity(m, ids, seq_len=args.seq_len, max_sequences=args.eval_sequences)  # noqa: E731
    dense_ppl = ppl(dense)
    print(json.dumps({"layers": args.layers, "dense_perplexity": round(dense_ppl, 3)}), flush=True)
    runs = [None, "lstsq", "snows"]
    for ratio in args.ratios:
        for refine in runs:
            model = copy.deepcopy(dense)
            options = {"refine_options": {"k": args.k, "max_cg": args.max_cg}} if refine == "snows" else {}
            t0 = time.perf_counter()
            result = pk.prune_structured(model, calibration, structures="mlp", ratio=ratio, method="wanda",
                                         refine=refine, progress=False, **options)
            seconds = time.perf_counter() - t0
            row = {"ratio": ratio, "refine": str(refine),
                   "width": model.config.intermediate_size, "x_dense_perplexity": round(ppl(model) / dense_ppl, 4),
                   "hidden_rel_error": round(hidden_error(model, dense, ids, args.seq_len, 8), 5),
                   "seconds": round(seconds, 1), "k": args.k, "max_cg": args.max_cg,
                   "calibration": f"{args.sequences}x{args.seq_len} in batches of {args.batch}",
                   "lookahead": [[round(a, 6) for a in r.lookahead] for r in result.reports if r.lookahead],
                   "threads": args.threads}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
