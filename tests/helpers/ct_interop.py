"""Run by tests/formats/test_export_ct.py in the `.venv-ct` venv (compressed-tensors + transformers < 5, no prunekit).

Usage: python tests/helpers/ct_interop.py FOLDER REFERENCE.safetensors REPORT.json

REFERENCE holds the pruned model's state dict plus ``__prompt__``, ``__tokens__`` (its greedy
continuation) and ``__logits__``. Checks, with the package's own code: its decompression of FOLDER
returns every compressed weight exactly; for the bitmask format, its own compression of the
reference weights gives the same stored tensors as FOLDER; transformers' from_pretrained (or, where
it fails for the package's own reasons, ModelCompressor.decompress into a model built from the
config) loads FOLDER with the same weights and generates the same tokens. Writes what it found to REPORT.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file


def zero_sign_free(t):
    """Bit pattern with -0.0 turned into +0.0 (the format does not keep the sign of a zero)."""
    t = t.clone()
    t[t == 0] = 0
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(zero_sign_free(a), zero_sign_free(b))


def main(folder, reference, report_path):
    import compressed_tensors
    import transformers
    from compressed_tensors.compressors import ModelCompressor

    ref = load_file(reference)
    prompt, tokens, logits = ref.pop("__prompt__"), ref.pop("__tokens__"), ref.pop("__logits__")
    with open(os.path.join(folder, "config.json")) as f:
        qconfig = json.load(f)["quantization_config"]
    report = {"compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
              "torch": torch.__version__, "format": qconfig["sparsity_config"]["format"]}

    compressor = ModelCompressor.from_compression_config(qconfig)
    decompressed = dict(compressor.sparsity_compressor.decompress(folder))
    stored = load_file(os.path.join(folder, "model.safetensors"))
    compressed_names = sorted(k[: -len(".bitmask")] + ".weight" for k in stored if k.endswith(".bitmask"))
    report["compressed_weights"] = len(compressed_names)
    report["decompressed_exact"] = sum(same(decompressed[k], ref[k]) for k in compressed_names if k in decompressed)
    report["dense_exact"] = sum(same(decompressed[k], ref[k]) for k in decompressed if k not in compressed_names)
    report["dense_entries"] = len(decompressed) - len([k for k in compressed_names if k in decompressed])

    if report["format"] == "sparse-bitmask":  # the package's own compression, tensor by tensor
        ours = {k: v for k, v in stored.items()}
        theirs = compressor.sparsity_compressor.compress({k: ref[k] for k in compressed_names},
                                                         compression_targets={k[: -len(".weight")] for k in compressed_names})
        report["package_compress_identical"] = sum(
            k in ours and ours[k].dtype == v.dtype and torch.equal(ours[k], v) for k, v in theirs.items())
        report["package_compress_tensors"] = len(theirs)

    dtype = next(v.dtype for v in ref.values() if v.is_floating_point())
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        report["loaded_by"] = "from_pretrained"
    except NotImplementedError as e:
        # transformers >= 4.53 compresses the empty (meta) model before loading, and the package's
        # sparse-bitmask compressor cannot handle meta tensors: whatever the file, from_pretrained
        # fails. The package's own path: build the model, then decompress the folder into it.
        report["from_pretrained_error"] = f"{type(e).__name__}: {e}"
        config = transformers.AutoConfig.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        compressor.decompress(folder, model)
        model.tie_weights()  # decompress puts new Parameters in place: tie the LM head again
        report["loaded_by"] = "ModelCompressor.decompress"
    loaded = model.state_dict()
    report["loaded_exact"] = sum(same(loaded[k], v) for k, v in ref.items() if k in loaded)
    report["reference_entries"] = len(ref)
    report["loaded_class"] = type(model).__name__
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens.shape[1] - prompt.shape[1], do_sample=False)
        their_logits = model(prompt).logits
    report["same_tokens"] = bool(torch.equal(out, tokens))
    report["max_logit_diff"] = float((their_logits.float() - logits.float()).abs().max())
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
