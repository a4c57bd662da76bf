"""prunekit.formats.compressed_tensors: compressed-tensors directories, our reader, the schema, and the package itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import prunekit as pk
from helpers.ct_interop import same  # noqa: E402  (equal tensors, -0.0 read as +0.0: the format drops zeros' sign)
from prunekit.formats.compressed_tensors import (bitmask_compress, decompress, is_24, load_compressed_tensors, save_compressed_tensors,
                                sparse24_compress, targets_and_ignore)

ROOT = Path(__file__).resolve().parents[2]
CT_PYTHON = Path(os.environ.get("PRUNEKIT_CT_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))
# the keys compressed-tensors 0.14's SparsityCompressionConfig.model_dump() writes
SPARSITY_KEYS = {"format", "global_sparsity", "ignore", "registry_requires_subclass", "sparsity_structure", "targets"}


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(dtype)


def config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prune, fmt", [({"sparsity": 0.5}, "sparse-bitmask"), ({"sparsity": 0.9}, "sparse-bitmask"),
                                        ({"pattern": "2:4"}, "sparse-24-bitmask")])
def test_round_trip_is_exact(tmp_path, dtype, prune, fmt):
    model = mlp()
    pk.prune(model, None, **prune, progress=False)
    model.to(dtype)
    info = save_compressed_tensors(model, tmp_path)
    assert info["format"] == fmt and info["compressed"] == ["0", "2"]  # the head (4) is not pruned
    back = load_compressed_tensors(tmp_path)
    ours = model.state_dict()
    assert sorted(back) == sorted(ours)
    assert all(same(back[k], v) for k, v in ours.items())
    assert info["bytes"] == os.path.getsize(tmp_path / "model.safetensors") < info["dense_bytes"]


def test_negative_zeros_come_back_positive_and_nan_is_kept(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        w = model[0].weight
        w.mul_((torch.arange(w.numel()).reshape(w.shape) % 3 == 0).to(w.dtype))  # w * mask: -0.0 where w < 0
        w[0, 0] = float("nan")
    negative_zeros = int(((w == 0) & torch.signbit(w)).sum())
    assert negative_zeros > 0
    assert is_24(w)  # 1 in 3 kept: also written as 2:4, whose filler slots hold +0.0 too
    for fmt in ("sparse-bitmask", "sparse-24-bitmask"):
        save_compressed_tensors(model, tmp_path / fmt, format=fmt)
        back = load_compressed_tensors(tmp_path / fmt)["0.weight"]
        assert int(((back == 0) & torch.signbit(back)).sum()) == 0
        assert torch.isnan(back[0, 0]) and same(back, w)


def test_auto_picks_the_24_layout_only_when_every_compressed_weight_is_24(tmp_path):
    model = mlp()
    pk.prune(model, None, pattern="2:4", progress=False)
    assert save_compressed_tensors(model, tmp_path / "a")["format"] == "sparse-24-bitmask"
    with torch.no_grad():
        model[2].weight[0, :4] = 1.0  # 4 non-zeros in one group: no longer 2:4
    assert save_compressed_tensors(model, tmp_path / "b")["format"] == "sparse-bitmask"
    assert save_compressed_tensors(model, tmp_path / "c", format="sparse-bitmask")["format"] == "sparse-bitmask"
    assert same(load_compressed_tensors(tmp_path / "b")["2.weight"], model[2].weight)


def test_24_format_refuses_weights_that_are_not_24(tmp_path):
    model = mlp()
    pk.prune(model, None, sparsity=0.5, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"format='sparse-24-bitmask'.*\['0', '2'\].*pattern='2:4'"):
        save_compressed_tensors(model, tmp_path / "out", format="sparse-24-bitmask")
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"format": "bitmask"}, ValueError, "format must be one of auto, sparse-bitmask, sparse-24-bitmask"),
    ({"min_sparsity": 0}, ValueError, "min_sparsity must be a number in"),
    ({"min_sparsity": 1.5}, ValueError, "min_sparsity must be a number in"),
    ({"min_sparsity": True}, ValueError, "min_sparsity must be a number in"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        save_compressed_tensors(mlp(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_not_a_module_and_meta_weights_are_refused(tmp_path):
    with pytest.raises(TypeError, match="needs an nn.Module, got OrderedDict"):
        save_compressed_tensors(mlp().state_dict(), tmp_path)
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        save_compressed_tensors(meta, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_only_weights_sparse_enough_are_compressed(tmp_path):
    model = mlp()
    pk.prune(model, None, sparsity=0.5, progress=False)  # the head (4) is not pruned
    with torch.no_grad():
        model[4].weight[:, :19] = 0  # 19/64 = 0.297 < 0.4: stays dense
    info = save_compressed_tensors(model, tmp_path)
    assert info["compressed"] == ["0", "2"]
    stored = load_file(tmp_path / "model.safetensors")
    assert "4.weight" in stored and "4.bitmask" not in stored and "0.weight" not in stored
    sc = config(tmp_path)["quantization_config"]["sparsity_config"]
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["4"]
    assert save_compressed_tensors(model, tmp_path / "low", min_sparsity=0.25)["compressed"] == ["0", "2", "4"]


def test_stored_layout_bit_order_and_dtypes():
    w = torch.zeros(2, 10)
    w[0, 0], w[0, 9], w[1, 3] = 1.0, 2.0, -3.0
    parts = bitmask_compress(w)
    assert parts["bitmask"].tolist() == [[1, 2], [8, 0]]  # bit j of a row is bit j % 8 of byte j // 8
    assert parts["compressed"].tolist() == [1.0, 2.0, -3.0] and parts["row_offsets"].tolist() == [0, 2]
    assert parts["shape"].tolist() == [2, 10] and parts["shape"].dtype == torch.int64
    assert parts["bitmask"].dtype == torch.uint8 and parts["row_offsets"].dtype == torch.int64
    assert torch.equal(decompress(parts), w)
    v = torch.tensor([[0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0]])
    assert is_24(v) and not is_24(torch.ones(1, 8)) and not is_24(torch.zeros(1, 6))
    p24 = sparse24_compress(v)
    # the first group keeps its non-zero and its first zero, in column order
    assert p24["compressed"].tolist() == [[0.0, 5.0, 1.0, 2.0]] and p24["bitmask"].tolist() == [[0b01010011]]
    assert p24["shape"].tolist() == [[1], [8]]
    assert torch.equal(decompress(p24), v)


def test_decompress_refuses_a_mask_that_does_not_fit_the_values():
    parts = bitmask_compress(torch.eye(8))
    parts["compressed"] = parts["compressed"][:-1]
    with pytest.raises(ValueError, match="bitmask keeps 8 entries but 7 values are stored"):
        decompress(parts)


def test_targets_fall_back_to_names_when_few_of_a_class_are_compressed():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    assert targets_and_ignore(model, {"1", "3"}) == (["1", "3"], [])
    assert targets_and_ignore(model, {"0", "1", "3"}) == (["Linear"], ["2", "4"])

    class MyLinear(nn.Linear):  # compressed-tensors matches "Linear" on base classes too
        pass

    mixed = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), MyLinear(4, 4))
    assert targets_and_ignore(mixed, {"1", "2"}) == (["MyLinear"], [])
    assert targets_and_ignore(mixed, {"0", "1"}) == (["Linear"], ["2"])  # "Linear" matches MyLinear too


def test_hugging_face_directory_schema(tmp_path):
    transformers = pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    model = tiny_llama()
    pk.prune(model, None, pattern="2:4", progress=False)
    info = save_compressed_tensors(model, tmp_path)
    cfg = config(tmp_path)
    q = cfg["quantization_config"]
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert set(q) == {"quant_method", "version", "sparsity_config", "transform_config"}
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert set(sc) == SPARSITY_KEYS
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]  # the tied head is not pruned
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules()) - 1
    assert len(info["compressed"]) == n_linear == 14
    stored = load_file(tmp_path / "model.safetensors")
    w = model.model.layers[0].mlp.down_proj.weight
    prefix = "model.layers.0.mlp.down_proj"
    assert {k for k in stored if k.startswith(prefix + ".")} == {f"{prefix}.{p}" for p in ("shape", "compressed", "bitmask")}
    assert stored[f"{prefix}.compressed"].shape == (w.shape[0], w.shape[1] // 2)
    assert stored[f"{prefix}.bitmask"].shape == (w.shape[0], w.shape[1] // 8)
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    assert 0 < sc["global_sparsity"] < 0.5
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "llama"


def test_transformers_5_without_the_package_refuses_to_load(tmp_path):
    """What the docs say: the main venv's transformers cannot load the directory by itself."""
    transformers = pytest.importorskip("transformers")
    try:
        import compressed_tensors  # noqa: F401
        pytest.skip("compressed-tensors is installed in this venv")
    except ImportError:
        pass
    from helpers.llama_toys import tiny_llama

    model = tiny_llama()
    pk.prune(model, None, sparsity=0.5, progress=False)
    save_compressed_tensors(model, tmp_path)
    with pytest.raises(ImportError, match="compressed-tensors"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


# -- against the compressed-tensors package (in its own venv: make check-ct) ----------------------
@pytest.mark.parametrize("prune, dtype, fmt", [({"sparsity": 0.5}, torch.float32, "sparse-bitmask"),
                                               ({"pattern": "2:4"}, torch.float32, "sparse-24-bitmask"),
                                               ({"sparsity": 0.9}, torch.bfloat16, "sparse-bitmask")])
def test_package_decompresses_and_transformers_generates_alike(tmp_path, prune, dtype, fmt):
    if not CT_PYTHON.exists():
        pytest.skip(f"no {CT_PYTHON}: run `make check-ct` (builds .venv-ct with compressed-tensors 0.14.0.1)")
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    model = tiny_llama()
    pk.prune(model, None, **prune, progress=False)
    model.to(dtype)
    info = save_compressed_tensors(model, tmp_path / "ct")
    assert info["format"] == fmt
    prompt = torch.tensor([[1, 17, 42, 5, 9]])
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        logits = model(prompt).logits
    reference = {k: v.contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({**reference, "__prompt__": prompt, "__tokens__": tokens, "__logits__": logits}, tmp_path / "ref.safetensors")
    run = subprocess.run([str(CT_PYTHON), str(ROOT / "tests" / "helpers" / "ct_interop.py"), str(tmp_path / "ct"),
                          str(tmp_path / "ref.safetensors"), str(tmp_path / "report.json")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))
    assert report["compressed_tensors"] == "0.14.0.1" and report["format"] == fmt
    assert report["compressed_weights"] == report["decompressed_exact"] == 14
    assert report["dense_exact"] == report["dense_entries"] == len(reference) - 14
    if fmt == "sparse-bitmask":
        assert report["package_compress_identical"] == report["package_compress_tensors"] == 14 * 4
    if report["loaded_by"] != "from_pretrained":  # a bug of the package, not of the file: see docs/shipping.md
        assert fmt == "sparse-bitmask" and report["from_pretrained_error"] == (
            "NotImplementedError: Cannot copy out of meta tensor; no data!")
    assert report["loaded_class"] == "LlamaForCausalLM"
    assert report["loaded_exact"] == report["reference_entries"] == len(reference)
    assert report["same_tokens"] and report["max_logit_diff"] <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_load_into_a_model_checks_first_and_keeps_ties(tmp_path):
    from test_export import Net  # Linear, Conv2d, a tied head, an integer buffer, a bf16 parameter

    torch.manual_seed(0)
    model = Net()
    pk.prune(model, None, sparsity=0.6, progress=False)
    info = save_compressed_tensors(model, tmp_path)
    assert info["compressed"] == ["fc1", "fc2"]  # the conv (4-D) and the tied head stay dense
    fresh = Net()
    assert pk.load_compressed_tensors(tmp_path, fresh) is fresh
    assert fresh.head.weight is fresh.emb.weight
    assert all(same(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    other = nn.Sequential(nn.Linear(32, 64))
    before = other[0].weight.clone()
    with pytest.raises(ValueError, match=r"does not fit this Sequential: missing in file \['0.weight', '0.bias'\]"):
        pk.load_compressed_tensors(tmp_path, other)
    assert torch.equal(other[0].weight, before)
