"""How much SmolLM2's SparseGPT 2:4 perplexity moves with float summation order alone.

Runs prunekit's SparseGPT 2:4 on the peers benchmark's cached model and data (``make bench-peers``
prepares them) with one change at a time and prints the perplexity with the same evaluator:

    python benchmarks/sparsegpt_24_variants.py bs1      # calibration batches of 1 sequence (llm-compressor's)
    python benchmarks/sparsegpt_24_variants.py fp32     # float32 statistics and solves
    python benchmarks/sparsegpt_24_variants.py noexact  # exact=False (dead input columns zeroed)
    python benchmarks/sparsegpt_24_variants.py default  # as benchmarks/peers.py runs it
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.llm import decoder_blocks  # noqa: E402


def main(variant: str) -> None:
    model, tokens = peers._load(2)
    batches = [{"input_ids": b, "use_cache": False} for b in tokens["calibration"].split(1 if variant == "bs1" else 8)]
    kwargs = {"stats_dtype": "float32"} if variant == "fp32" else {"exact": False} if variant == "noexact" else {}
    start = time.perf_counter()
    pk.prune(model, batches, pattern="2:4", method="sparsegpt", blocks=decoder_blocks(model), progress=False, **kwargs)
    seconds = time.perf_counter() - start
    ppl = pk.perplexity(model, tokens["eval"], seq_len=peers.SEQ_LEN, max_sequences=peers.EVAL_SEQUENCES)
    print(json.dumps({"variant": variant, "seconds": round(seconds, 1), "perplexity": round(ppl, 3)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default")
