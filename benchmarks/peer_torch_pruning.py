"""torch-pruning's side of benchmarks/structured_peer.py: MLP channels of a saved llama model.

Runs in its own venv (``make .venv-tp``: torch-pruning 1.6.1, transformers, safetensors; no
prunekit), so the perplexity loop below is a copy of ``prunekit.perplexity``'s. One call does
one job and prints one JSON line:

    python benchmarks/peer_torch_pruning.py MODEL_DIR TOKENS.pt --dense
    python benchmarks/peer_torch_pruning.py MODEL_DIR TOKENS.pt --importance taylor --keep 1126

Pruning follows torch-pruning's own LLM example (examples/LLMs/prune_llm.py): ``MetaPruner``
over the Hugging Face model traced with ``example_inputs``, local (per-layer) ranking, the
config's ``intermediate_size`` set afterwards. It differs where the benchmark needs it to:
only MLP channels go (lm_head, the embeddings and every attention projection are ignored, so
the hidden-size and head groups are never pruned), ``round_to`` is left off (the example's 4
would move the widths off prunekit's), and the ratio is chosen so every layer keeps exactly
``--keep`` channels. The importance is ``GroupMagnitudeImportance(p=2)`` (the example's,
called ``GroupNormImportance`` there) or ``GroupTaylorImportance`` with gradients of the
causal LM loss over the calibration tokens (timed as part of the prune).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn

SEQ_LEN, EVAL_SEQUENCES, BATCH = 256, 32, 8


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int = SEQ_LEN, batch_size: int = BATCH,
               max_sequences: int = EVAL_SEQUENCES) -> float:
    """``prunekit.perplexity``'s loop: summed next-token NLL over non-overlapping windows."""
    tokens = tokens.reshape(-1)
    n = min(tokens.numel() // seq_len, max_sequences)
    seqs = tokens[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    model.eval()
    for batch in seqs.split(batch_size):
        logits = model(input_ids=batch).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def taylor_gradients(model: nn.Module, calibration: torch.Tensor) -> None:
    """Fill ``.grad`` with the gradient of the mean next-token loss over the calibration windows."""
    model.zero_grad()
    batches = calibration.split(BATCH)
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss / len(batches)
        loss.backward()


def prune(model: nn.Module, calibration: torch.Tensor, importance: str, keep: int) -> dict:
    """MetaPruner on the MLP channels of every decoder layer, ``keep`` of them left per layer."""
    import torch_pruning as tp

    width = model.config.intermediate_size
    if not 0 < keep < width:
        raise ValueError(f"--keep must be in (0, {width}), got {keep}")
    # torch-pruning keeps int(width * (1 - ratio)) channels: aim half a channel above keep
    ratio = 1 - (keep + 0.5) / width
    imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        attn = layer.self_attn
        ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    example = calibration[:1, :16]
    if importance == "taylor":
        taylor_gradients(model, calibration)
    pruner = tp.pruner.MetaPruner(model, example_inputs=example, importance=imp, global_pruning=False,
                                  pruning_ratio=ratio, ignored_layers=ignored, round_to=None,
                                  # transformers 5 returns a DynamicCache, which tp's flatten_as_list
                                  # cannot walk (AttributeError: 'tuple' object has no attribute
                                  # 'grad_fn'): trace from the logits alone
                                  output_transform=lambda out: out.logits)
    pruner.step()
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    model.config.intermediate_size = widths[0]
    for layer in model.model.layers:  # what the example updates (the module reads its shape from the weights)
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
    model.zero_grad(set_to_none=True)
    return {"ratio_passed": ratio, "widths": widths}


def decoder_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("tokens", help="torch.save'd {'calibration': (n, 256) ids, 'eval': flat ids}")
    p.add_argument("--dense", action="store_true", help="only the dense model's perplexity")
    p.add_argument("--importance", choices=("magnitude", "taylor"), default="magnitude")
    p.add_argument("--keep", type=int, help="MLP channels kept per layer")
    p.add_argument("--eval-sequences", type=int, default=EVAL_SEQUENCES, help="windows of 256 tokens scored")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokens = torch.load(args.tokens)
    dense = decoder_params(model)
    row = {"torch": torch.__version__, "torch_pruning": version("torch-pruning"),
           "transformers": version("transformers"), "threads": torch.get_num_threads()}
    if not args.dense:
        if args.keep is None:
            raise ValueError("--keep is required unless --dense")
        t0 = time.perf_counter()
        row.update(prune(model, tokens["calibration"], args.importance, args.keep))
        row["prune_seconds"] = round(time.perf_counter() - t0, 1)
        row["decoder_params_removed"] = 1 - decoder_params(model) / dense
    t0 = time.perf_counter()
    with torch.no_grad():
        row["perplexity"] = perplexity(model, tokens["eval"], max_sequences=args.eval_sequences)
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    row["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
