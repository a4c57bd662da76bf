"""prunekit.formats.pretrained, and Hugging Face round trips of a pruned all-MiniLM-L6-v2: plain
save_pretrained, the compact file (save / load / load_masks) and the compact folder."""
import copy
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.formats.compact import CheckpointError, load, load_masks, save  # noqa: E402
from prunekit.formats.pretrained import load_pretrained_compressed, save_pretrained_compressed  # noqa: E402


@pytest.fixture(scope="module")
def pruned(minilm):
    model = copy.deepcopy(minilm[1])
    pk.prune(model, None, sparsity=0.5, progress=False)
    return model


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_save_pretrained_is_an_ordinary_checkpoint(pruned, tmp_path):
    pruned.save_pretrained(tmp_path)
    back = transformers.AutoModel.from_pretrained(tmp_path)  # plain transformers, no prunekit
    theirs = back.state_dict()
    assert list(theirs) == list(pruned.state_dict())
    assert all(same_bits(v, theirs[k]) for k, v in pruned.state_dict().items())
    q = back.encoder.layer[0].attention.self.query.weight
    assert abs(float((q == 0).float().mean()) - 0.5) < 1e-3


def test_compressed_round_trip_is_bit_exact(pruned, tmp_path):
    f = tmp_path / "minilm.safetensors"
    info = save(pruned, f)
    assert info["patterns"]["unstructured"] >= 36
    assert info["bytes"] < 0.8 * info["dense_bytes"]
    fresh = transformers.AutoModel.from_config(pruned.config).eval()
    load(f, fresh)
    assert all(same_bits(v, fresh.state_dict()[k]) for k, v in pruned.state_dict().items())
    masks = load_masks(f, names=list(pk.find_targets(fresh)))
    assert set(masks) == set(pk.find_targets(fresh))  # the 36 encoder Linears and the pooler
    enc = [n for n in masks if n.startswith("encoder.")]
    assert len(enc) == 36 and all(abs(1 - float(masks[n].float().mean()) - 0.5) < 1e-3 for n in enc)


def test_pretrained_compressed_directory(pruned, tmp_path):
    save_pretrained_compressed(pruned, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.prunekit.safetensors"]
    back = load_pretrained_compressed(tmp_path)
    assert type(back) is type(pruned)
    assert all(same_bits(v, back.state_dict()[k]) for k, v in pruned.state_dict().items())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, pruned(input_ids=ids).last_hidden_state)


def test_wrong_architecture_is_refused(pruned, tmp_path):
    f = tmp_path / "minilm.safetensors"
    save(pruned, f)
    config = copy.deepcopy(pruned.config)
    config.num_hidden_layers = 2
    small = transformers.AutoModel.from_config(config)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(CheckpointError, match="saved from BertModel.*not in model.*encoder.layer.2"):
        load(f, small)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
def test_config_built_causal_lm_comes_back_as_its_own_class(name, tmp_path):
    config_class = {"Qwen2ForCausalLM": transformers.Qwen2Config, "LlamaForCausalLM": transformers.LlamaConfig}[name]
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()  # built from a config: config.architectures is None
    assert model.config.architectures is None
    pk.prune(model, None, sparsity=0.5, progress=False)
    save_pretrained_compressed(model, tmp_path)
    assert model.config.architectures is None  # the model's own config is left as it was
    back = load_pretrained_compressed(tmp_path)
    assert type(back) is type(model)
    assert all(same_bits(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("architectures") == [name]
    (tmp_path / "config.json").write_text(json.dumps(config))  # as save_pretrained_compressed wrote before
    assert type(load_pretrained_compressed(tmp_path)) is type(model)  # the checkpoint's model_class

