"""Depth pruning: the least important blocks go, the model stays a standard, reloadable one."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk

from helpers.llama_toys import token_batches


def _tokens(n=3, seed=1):
    return token_batches(n, seed, length=16)


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    return tiny_llama(4)


def test_importance_is_one_minus_cosine_of_block_input_and_output(llama):
    m = copy.deepcopy(llama)
    with torch.no_grad():  # block 2 becomes an identity: its residual branches write zeros
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    scores = pk.block_importance(m, _tokens())
    assert list(scores) == [f"model.layers.{i}" for i in range(4)]
    assert scores["model.layers.2"] == pytest.approx(0.0, abs=1e-6)
    assert all(v > 1e-3 for k, v in scores.items() if k != "model.layers.2")


def test_prune_blocks_removes_the_identity_block_and_reloads(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = copy.deepcopy(llama)
    with torch.no_grad():
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    x = _tokens(1, seed=5)[0]
    before = m(x).logits
    result = pk.prune_blocks(m, _tokens(), count=1)
    assert result.removed == ["model.layers.2"] and len(m.model.layers) == 3 and m.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1, 2]
    # removing an exact identity changes nothing (float32 rounding of the same products only)
    torch.testing.assert_close(m(x).logits, before, rtol=1e-5, atol=1e-5)
    assert m.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)  # the KV cache works
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(back(x).logits, m(x).logits)


@pytest.mark.parametrize("kwargs, match", [(dict(count=4), "at least one block stays"),
                                           (dict(count=1, ratio=0.5), "exactly one of"),
                                           (dict(ratio=1.5), "ratio must be")])
def test_bad_counts_are_refused_and_leave_the_model(llama, kwargs, match):
    m = copy.deepcopy(llama)
    with pytest.raises(ValueError, match=match):
        pk.prune_blocks(m, _tokens(), **kwargs)
    assert len(m.model.layers) == 4 and m.config.num_hidden_layers == 4


def test_blocks_outside_one_module_list_are_refused():
    with pytest.raises(ValueError, match="one nn.ModuleList"):
        pk.prune_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), [torch.randn(1, 2)], count=1)
