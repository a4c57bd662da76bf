"""load_structured: a Llama pruned to different widths per layer comes back from save_pretrained
with identical logits and a working generate(); a uniform one still loads with plain from_pretrained."""
import copy
import json
import warnings

import pytest
import torch

import prunekit as pk

from helpers.llama_toys import token_batches


def _tokens(n=4, seed=1):
    return token_batches(n, seed, length=24)


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    return tiny_llama(2)


def _nonuniform(llama):
    m = copy.deepcopy(llama)
    data = _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune_structured(m, data, structures="mlp", params=0.25, budget="global", progress=False)
        # a quarter of all heads: one query head per key/value group, in one layer only
        pk.prune_structured(m, data, structures="heads", ratio=0.25, budget="global", progress=False)
    return m


def test_nonuniform_llama_saves_and_loads_with_one_call(llama, tmp_path):
    m = _nonuniform(llama)
    mlp = [layer.mlp.down_proj.in_features for layer in m.model.layers]
    heads = [layer.self_attn.o_proj.in_features // 16 for layer in m.model.layers]
    assert len(set(mlp)) > 1 and sorted(heads) == [2, 4]
    m.save_pretrained(tmp_path)
    assert "prunekit_shapes" in json.loads((tmp_path / "config.json").read_text())
    back = pk.load_structured(tmp_path)
    assert [layer.mlp.down_proj.in_features for layer in back.model.layers] == mlp
    x = _tokens(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(back(x).logits, m(x).logits)
    prompt = x[:1, :5]
    out = back.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(out, m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True))
    with torch.no_grad():  # the cached decode is the uncached forward's greedy choice
        assert torch.equal(out[:, 5:], m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)[:, 5:])


def test_depth_pruning_after_a_nonuniform_one_renumbers_the_record(llama, tmp_path):
    m = _nonuniform(llama)
    pk.prune_blocks(m, _tokens(), count=1)
    m.save_pretrained(tmp_path)
    back = pk.load_structured(tmp_path)
    x = _tokens(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(back(x).logits, m(x).logits)


def test_uniform_result_needs_no_prunekit_to_load(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = copy.deepcopy(llama)
    pk.prune_structured(m, _tokens(), structures="mlp,heads", flops=0.25, progress=False)
    m.save_pretrained(tmp_path)
    assert "prunekit_shapes" not in json.loads((tmp_path / "config.json").read_text())
    x = _tokens(1, seed=9)[0]
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = pk.load_structured(tmp_path)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, m(x).logits) and torch.equal(ours(x).logits, m(x).logits)


def test_a_folder_without_weights_is_refused(llama, tmp_path):
    llama.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        pk.load_structured(tmp_path)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_heads_a_config_cannot_hold_reload_with_load_structured(arch, tmp_path):
    """BERT and GPT-2 derive the head size from the config, so fewer heads live only in the
    recorded shapes (``all_head_size`` / ``split_size`` included): load_structured rebuilds them."""
    transformers = pytest.importorskip("transformers")
    if arch == "bert":
        cls = transformers.BertModel
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64)
    else:
        cls = transformers.GPT2LMHeadModel
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                         eos_token_id=0)
    torch.manual_seed(0)
    model = cls(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune_structured(model, _tokens(), structures="mlp,heads", ratio=0.25, progress=False)
    x = _tokens(1, seed=2)[0]
    with torch.no_grad():
        expected = model(x)[0]
    model.save_pretrained(tmp_path)
    again = pk.load_structured(tmp_path, cls)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], expected, rtol=0, atol=0)
