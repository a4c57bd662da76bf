import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prunekit.jobs import loading
from prunekit.jobs.loading import build_calibration, check_calibration_fits, load_model

SRC = "helpers.loading_toys:tiny_mlp"


def test_factory_with_kwargs_is_eval():
    model, tok = load_model(SRC, kwargs={"width": 12})
    assert tok is None and not model.training and model[0].out_features == 12


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_state_dict_round_trip(tmp_path, ext):
    ref, _ = load_model(SRC)
    with torch.no_grad():
        ref[0].weight.fill_(0.25)
    path = str(tmp_path / f"w{ext}")
    torch.save(ref.state_dict(), path) if ext == ".pt" else save_file(ref.state_dict(), path)
    model, _ = load_model(SRC, state_dict=path)
    assert torch.equal(model[0].weight, ref[0].weight)


def test_training_checkpoint_dict(tmp_path):
    ref, _ = load_model(SRC)
    torch.save({"model": ref.state_dict(), "step": torch.tensor(3)}, tmp_path / "ckpt.pt")
    model, _ = load_model(SRC, state_dict=str(tmp_path / "ckpt.pt"))
    assert torch.equal(model[2].weight, ref[2].weight)


def test_prunekit_compressed_state_dict(tmp_path):
    import prunekit as pk

    ref, _ = load_model(SRC)
    pk.save(ref, tmp_path / "m.prunekit.safetensors")
    model, _ = load_model(SRC, state_dict=str(tmp_path / "m.prunekit.safetensors"))
    assert torch.equal(model[4].bias, ref[4].bias)


def test_wrong_keys_and_shapes(tmp_path):
    ref, _ = load_model(SRC, kwargs={"width": 12})
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="does not fit the model.*shape mismatches.*model.kwargs"):
        load_model(SRC, state_dict=str(tmp_path / "w.pt"))
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "dp.pt")
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*'module.' prefix"):
        load_model(SRC, kwargs={"width": 12}, state_dict=str(tmp_path / "dp.pt"))


def test_a_tied_weight_may_be_stored_once_and_nothing_else_may_be_missing(tmp_path):
    def embed_and_head(tied: bool) -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
        if tied:
            model[1].weight = model[0].weight
        return model

    weight = torch.randn(10, 4)
    save_file({"0.weight": weight}, tmp_path / "w.safetensors")
    model = embed_and_head(tied=True)
    loading.load_state_dict_file(model, str(tmp_path / "w.safetensors"))
    assert torch.equal(model[1].weight, weight) and model[1].weight is model[0].weight
    with pytest.raises(ValueError, match=r"missing keys \['1.weight'\]"):
        loading.load_state_dict_file(embed_and_head(tied=False), str(tmp_path / "w.safetensors"))


def test_missing_things_are_named():
    with pytest.raises(FileNotFoundError, match="state_dict file .*nope.pt.* does not exist"):
        load_model(SRC, state_dict="nope.pt")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_model("helpers.loading_toys:missing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_model("no_such_mod:f")
    with pytest.raises(TypeError, match="not a callable"):
        load_model("helpers.loading_toys:NOT_CALLABLE")
    with pytest.raises(TypeError, match="not an nn.Module"):
        load_model("helpers.loading_toys:not_a_model")
    with pytest.raises(TypeError, match="check model.kwargs"):
        load_model(SRC, kwargs={"depth": 3})
    with pytest.raises(FileNotFoundError, match="model path .* does not exist; pass a Hugging Face model directory"):
        load_model("./no/such/model")
    with pytest.raises(FileNotFoundError, match="not a model in the offline Hugging Face cache"):
        load_model("no-such-model-name")
    with pytest.raises(ValueError, match="unknown builtin model"):
        load_model("builtin:gpt5")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("ext", [".pt", ".npy"])
def test_tensor_calibration(tmp_path, ext):
    model, _ = load_model(SRC)
    x = np.random.default_rng(0).standard_normal((70, 8))  # float64: cast to the model's dtype
    path = str(tmp_path / f"x{ext}")
    torch.save(torch.from_numpy(x), path) if ext == ".pt" else np.save(path, x)
    batches = build_calibration({"tensors": path, "batch_size": 32}, model, None)
    assert [len(b) for b in batches] == [32, 32, 6] and batches[0].dtype == torch.float32
    check_calibration_fits(model, batches)
    assert len(build_calibration({"tensors": path, "n_samples": 10}, model, None)) == 1


def test_tensor_file_errors(tmp_path):
    model, _ = load_model(SRC)
    torch.save({"x": torch.zeros(3)}, tmp_path / "d.pt")
    with pytest.raises(TypeError, match="not one tensor"):
        build_calibration({"tensors": str(tmp_path / "d.pt")}, model, None)
    with pytest.raises(FileNotFoundError, match="data.tensors file"):
        build_calibration({"tensors": str(tmp_path / "none.pt")}, model, None)
    with pytest.raises(ValueError, match="exactly one of text, corpus or tensors"):
        build_calibration({"corpus": "pydoc", "tensors": "x.pt"}, model, None)


def test_mismatched_data_raises_and_leaves_model(tmp_path):
    model, _ = load_model(SRC)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    np.save(tmp_path / "x.npy", np.zeros((4, 5), dtype=np.float32))
    batches = build_calibration({"tensors": str(tmp_path / "x.npy")}, model, None)
    with pytest.raises(ValueError, match="the calibration data does not fit the model: .*first batch has shapes"):
        check_calibration_fits(model, batches)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_text_without_tokenizer():
    model, _ = load_model(SRC)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_calibration({"corpus": "pydoc"}, model, None)


def test_text_files_with_minilm(tmp_path, minilm):
    tok, model = minilm
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "b.txt").write_text("Pruning removes weights that matter least. " * 40)
    data = {"text": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "seq_len": 16, "n_sequences": 6,
            "batch_size": 4}
    batches = build_calibration(data, model, tok)
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (2, 16)]
    assert all(set(b) == {"input_ids", "attention_mask"} and bool(b["attention_mask"].all()) for b in batches)
    check_calibration_fits(model, batches)
    with pytest.raises(ValueError, match="above the model's limit"):
        build_calibration({**data, "seq_len": 4096}, model, tok)


def test_pydoc_corpus_with_minilm(minilm):
    tok, model = minilm
    batches = build_calibration({"corpus": "pydoc", "seq_len": 32, "n_sequences": 3}, model, tok)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (3, 32)


def test_builtin_minilm_loads_tokenizer(minilm):
    model, tok = load_model("builtin:minilm")
    assert type(model).__name__ == "BertModel" and tok is not None and not model.training
    assert not loading.is_causal_lm(model)
