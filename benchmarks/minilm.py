"""Time and memory of one-shot pruning all-MiniLM-L6-v2 (22.7M parameters) on 2 CPU cores.

Issue targets: SparseGPT at 50% on 128 sequences x 128 tokens in under 60 s; SNOWS refinement
in under 10 minutes; peak memory during pruning below 2x the model plus one block's
activations. Memory is the growth of the process's peak resident set (VmHWM) over its resident
set just before pruning (after one warm-up forward), so the Python/transformers baseline is not
counted.

    python benchmarks/minilm.py --method sparsegpt
    python benchmarks/minilm.py --method sparsegpt --refine snows
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prunekit.zoo.memory import reset_peak, resident_mib  # noqa: E402


def main(argv=None) -> None:
    import prunekit as pk
    from prunekit.zoo.minilm import load_minilm
    from prunekit.zoo.text import pydoc_text, split_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="sparsegpt", choices=pk.METHODS)
    p.add_argument("--refine", default=None, choices=["lstsq", "snows"])
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=3, help="SNOWS lookahead (ViT reference: 3)")
    p.add_argument("--max-cg", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, model = load_minilm()
    text, _ = split_text(pydoc_text())
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    need = args.sequences * args.length
    if len(ids) < need:
        raise SystemExit(f"the calibration text has {len(ids)} tokens, fewer than {need}")
    seqs = ids[:need].view(args.sequences, args.length)
    calibration = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in seqs.split(args.batch)]
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    block_mib = args.sequences * args.length * model.config.intermediate_size * 4 / 2**20
    with torch.no_grad():  # warm up the allocator and kernels once, as any forward would
        model(**calibration[0])
    reset_peak()
    before = resident_mib("VmRSS")
    start = time.perf_counter()
    result = pk.prune(model, calibration, sparsity=0.5 if args.pattern == "unstructured" else None,
                      pattern=args.pattern, method=args.method, refine=args.refine,
                      refine_options={"k": args.k, "epochs": 1, "max_cg": args.max_cg} if args.refine == "snows" else None,
                      progress=False)
    seconds = time.perf_counter() - start
    grown = resident_mib("VmHWM") - before
    name = args.method + (f"+{args.refine}" if args.refine else "")
    print(f"{name} {args.pattern} on {args.sequences}x{args.length} tokens, {args.threads} threads: "
          f"{seconds:.1f} s, sparsity {result.sparsity:.4f}, peak memory growth {grown:.0f} MiB "
          f"(model {model_mib:.0f} MiB; one block's largest activation {block_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
