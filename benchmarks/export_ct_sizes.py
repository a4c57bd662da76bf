"""File sizes of a pruned all-MiniLM-L6-v2 as compressed-tensors, against dense safetensors and prunekit's own format.

The 37 Linear weights (36 encoder + pooler) are pruned by magnitude (no data) at 50%, 2:4 and 90%; each model is
written three ways: dense safetensors (``safetensors.torch.save_model``), compressed-tensors
(:func:`prunekit.save_compressed_tensors`, format "auto" and, for 2:4, the bitmask too) and
prunekit's own format (:func:`prunekit.save`). Every file is read back and checked against the
model. Sizes only (no timing). Writes benchmarks/results/export_ct.md and .json.

    python benchmarks/export_ct_sizes.py
"""
from __future__ import annotations

import copy
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_model  # noqa: E402

import prunekit as pk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = (("50% unstructured", {"sparsity": 0.5}, "auto"), ("2:4", {"pattern": "2:4"}, "auto"),
         ("2:4 as bitmask", {"pattern": "2:4"}, "sparse-bitmask"), ("90% unstructured", {"sparsity": 0.9}, "auto"))


def pruned_layer_bytes(stored: dict, names: list[str]) -> int:
    """Bytes of the stored parts of the compressed modules."""
    return sum(v.numel() * v.element_size() for k, v in stored.items() if k.rpartition(".")[0] in names)


def main() -> None:
    from prunekit.zoo.minilm import load_minilm

    _, dense = load_minilm()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs, fmt in CASES:
            model = copy.deepcopy(dense)
            pk.prune(model, None, progress=False, **kwargs)
            state = model.state_dict()
            save_model(model, os.path.join(tmp, "dense.safetensors"))
            dense_file = os.path.getsize(os.path.join(tmp, "dense.safetensors"))
            ct = os.path.join(tmp, "ct")
            info = pk.save_compressed_tensors(model, ct, format=fmt)
            back = pk.load_compressed_tensors(ct)
            assert all(torch.equal(back[k], v) for k, v in state.items() if k in back), label
            own = pk.save(model, os.path.join(tmp, "own.safetensors"))
            assert all(torch.equal(a, state[k]) for k, a in pk.load(os.path.join(tmp, "own.safetensors")).items())
            layers = [f"{n}.weight" for n in info["compressed"]]
            layer_dense = sum(state[k].numel() * state[k].element_size() for k in layers)
            ct_layers = pruned_layer_bytes(load_file(os.path.join(ct, "model.safetensors")), info["compressed"])
            rows.append({"case": label, "format": info["format"], "compressed_layers": len(layers),
                         "dense_bytes": dense_file, "ct_bytes": info["bytes"], "prunekit_bytes": own["bytes"],
                         "ct_over_dense": info["bytes"] / dense_file, "prunekit_over_dense": own["bytes"] / dense_file,
                         "ct_over_prunekit": info["bytes"] / own["bytes"],
                         "layers_ct_over_dense": ct_layers / layer_dense})
            print(rows[-1])
    with open(os.path.join(HERE, "results", "export_ct.json"), "w") as f:
        json.dump({"model": "all-MiniLM-L6-v2 (fp32)", "torch": torch.__version__, "rows": rows}, f, indent=2)
    lines = ["# compressed-tensors export: file sizes", "",
             "all-MiniLM-L6-v2, fp32, its 37 Linear weights (36 encoder + pooler) pruned by magnitude (no data); the word",
             "embeddings (11.7M of 22.7M parameters) stay dense. Command: `python benchmarks/export_ct_sizes.py`.",
             "Every file was read back and checked equal to the pruned model.", "",
             "| pattern | compressed-tensors format | layers compressed | dense MiB | compressed-tensors MiB | "
             "prunekit MiB | c-t / dense | prunekit / dense | c-t / prunekit | pruned layers: c-t / dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mib = 2 ** 20
    for r in rows:
        lines.append(f"| {r['case']} | {r['format']} | {r['compressed_layers']} | {r['dense_bytes'] / mib:.1f} | "
                     f"{r['ct_bytes'] / mib:.1f} | {r['prunekit_bytes'] / mib:.1f} | {r['ct_over_dense']:.3f} | "
                     f"{r['prunekit_over_dense']:.3f} | {r['ct_over_prunekit']:.3f} | {r['layers_ct_over_dense']:.3f} |")
    with open(os.path.join(HERE, "results", "export_ct.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
