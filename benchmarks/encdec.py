"""Encoder-decoders in one-shot ``prune()``: capture='chain' against 'rerun', and against
calibrating the decoder's blocks alone (the blocks detected before both stacks were).

T5 and Whisper at a small width (d_model 256, feed-forward 1,024, 4 + 4 blocks, a 2,048-token
vocabulary; Whisper fed 80 mel bins x 200 frames) built from configs with random weights (seeded;
nothing downloaded), SparseGPT at 50%, 8 calibration batches of 4. Three configurations, in one
process, alternated over ``--repeats`` on fresh copies of the same dense model:

* ``decoder blocks``: ``blocks=`` the decoder's blocks, so the encoder's layers are pruned in the
  whole-model pass after the decoder, on dense inputs (what the default did before);
* ``chain``: the default, every stack's blocks in execution order, the model re-run only where
  the blocks do not chain (a decoder's first block; T5's second blocks, which take the position
  bias the first computed);
* ``rerun``: ``capture="rerun"``, the model re-run up to every block.

Reported: ``prune()`` wall time (median), how many times the model was re-run to capture a
block's inputs (``captures``), the relative error of the pruned model's logits against the dense
model's on 4 held-out batches (``||pruned - dense|| / ||dense||``; random weights, so only the
comparison between configurations means anything), and the largest difference between the chain
and the rerun weights. The load average is read before every run.

    python benchmarks/encdec.py --repeats 2      # writes results/encdec.json and .md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIGS = ("decoder blocks", "chain", "rerun")


def build(name: str):
    """The dense model and its calibration and held-out batches (seeded)."""
    import transformers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=2048, d_model=256, d_kv=64, d_ff=1024, num_layers=4,
                                    num_decoder_layers=4, num_heads=4, decoder_start_token_id=0, pad_token_id=0)
        model = transformers.T5ForConditionalGeneration(cfg).eval()
        make = lambda: {"input_ids": torch.randint(2, 2048, (4, 64), generator=g),  # noqa: E731
                        "decoder_input_ids": torch.randint(2, 2048, (4, 32), generator=g)}
        decoder = [f"decoder.block.{i}" for i in range(4)]
    else:
        cfg = transformers.WhisperConfig(vocab_size=2048, num_mel_bins=80, encoder_layers=4, decoder_layers=4,
                                         d_model=256, encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_source_positions=100,
                                         max_target_positions=64, decoder_start_token_id=1, pad_token_id=0)
        model = transformers.WhisperForConditionalGeneration(cfg).eval()
        make = lambda: {"input_features": torch.randn(4, 80, 200, generator=g),  # noqa: E731
                        "decoder_input_ids": torch.randint(3, 2048, (4, 32), generator=g)}
        decoder = [f"model.decoder.layers.{i}" for i in range(4)]
    return model, [make() for _ in range(8)], [make() for _ in range(4)], decoder


@torch.no_grad()
def logits_error(model, dense, held_out) -> float:
    num = den = 0.0
    for batch in held_out:
        ref = dense(**batch).logits
        num += float((model(**batch).logits - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def run(name: str, repeats: int) -> dict:
    from prunekit.oneshot import pipeline

    import prunekit as pk

    dense, calib, held_out, decoder = build(name)
    real, count = pipeline.capture_inputs, [0]

    def counted(*a, **k):
        count[0] += 1
        return real(*a, **k)

    pipeline.capture_inputs = counted
    runs, weights = [], {}
    try:
        for r in range(repeats):
            for config in CONFIGS:
                model = copy.deepcopy(dense)
                options = {"decoder blocks": {"blocks": decoder}, "chain": {}, "rerun": {"capture": "rerun"}}[config]
                load = os.getloadavg()[0]
                count[0] = 0
                t0 = time.perf_counter()
                result = pk.prune(model, calib, sparsity=0.5, method="sparsegpt", progress=False, **options)
                seconds = time.perf_counter() - t0
                runs.append({"repeat": r + 1, "config": config, "seconds": seconds, "captures": count[0],
                             "sparsity": result.sparsity, "layers": len(result.layers),
                             "logits_error": logits_error(model, dense, held_out), "load1": load})
                print(json.dumps({"model": name, **runs[-1]}), flush=True)
                if r == 0 and config in ("chain", "rerun"):
                    weights[config] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        pipeline.capture_inputs = real
    diff = max(float((weights["chain"][k] - weights["rerun"][k]).abs().max()) for k in weights["chain"])
    return {"model": name, "runs": runs, "chain_vs_rerun_max_abs_diff": diff}


def markdown(data: dict) -> str:
    out = ["# Encoder-decoders in one-shot prune(): chain against rerun", "",
           f"Command: `{data['command']}`", "",
           f"torch {data['torch']}, transformers {data['transformers']}, {data['threads']} threads, CPU. "
           "Random weights from configs (d_model 256, feed-forward 1,024, 4 + 4 blocks, 2,048 tokens; Whisper fed "
           "80 mel bins x 200 frames), SparseGPT 50%, 8 calibration batches of 4; medians over "
           f"{data['repeats']} repeats, configurations alternated in one process. The machine is shared: the "
           "1-minute load average before each run is listed.", "",
           "| model | configuration | prune() s (median) | captures | layers | result.sparsity | logits rel. error "
           "| load avg (min-max) |",
           "|---|---|---|---|---|---|---|---|"]
    for m in data["models"]:
        for config in CONFIGS:
            rows = [r for r in m["runs"] if r["config"] == config]
            loads = [r["load1"] for r in rows]
            out.append(f"| {m['model']} | {config} | {statistics.median(r['seconds'] for r in rows):.2f} | "
                       f"{rows[0]['captures']} | {rows[0]['layers']} | {rows[0]['sparsity']:.4f} | "
                       f"{rows[0]['logits_error']:.4f} | {min(loads):.1f}-{max(loads):.1f} |")
    out += ["", "Largest difference between the chain and the rerun weights: "
            + ", ".join(f"{m['model']} {m['chain_vs_rerun_max_abs_diff']:.3g}" for m in data["models"]) + ".", "",
            "Every run, in order:", "", "| model | repeat | configuration | prune() s | load avg |",
            "|---|---|---|---|---|"]
    for m in data["models"]:
        out += [f"| {m['model']} | {r['repeat']} | {r['config']} | {r['seconds']:.2f} | {r['load1']:.1f} |"
                for r in m["runs"]]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="t5,whisper")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    data = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": args.threads, "repeats": args.repeats,
            "models": [run(name, args.repeats) for name in args.models.split(",")]}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "encdec.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(RESULTS, "encdec.md"), "w") as f:
        f.write(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
