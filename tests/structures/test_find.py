"""Structures are found from module layouts of models we did not write (transformers configs, torch layers)."""
import pytest
from torch import nn

from prunekit.structures import find_structures


def test_llama_mlp_and_grouped_query_heads():
    from helpers.llama_toys import tiny_llama

    found = find_structures(tiny_llama(2), ("mlp", "heads"))
    assert [(s.kind, s.owner) for s in found] == [
        ("heads", "model.layers.0.self_attn"), ("mlp", "model.layers.0.mlp"),
        ("heads", "model.layers.1.self_attn"), ("mlp", "model.layers.1.mlp")]
    heads, mlp = found[0], found[1]
    assert (heads.units, heads.unit_size, heads.q_per_kv, heads.kv_heads) == (4, 16, 2, 2)
    assert mlp.producers == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert (mlp.consumer, mlp.units, mlp.config_key) == ("model.layers.0.mlp.down_proj", 128, "intermediate_size")


def test_bert_gpt2_and_torch_encoder_mlps():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                                          num_hidden_layers=2))
    assert [(s.producers, s.consumer) for s in find_structures(bert)] == [
        (("encoder.layer.0.intermediate.dense",), "encoder.layer.0.output.dense"),
        (("encoder.layer.1.intermediate.dense",), "encoder.layer.1.output.dense")]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=50))
    (s,) = find_structures(gpt2)
    assert (s.producers, s.consumer, s.units, s.config_key) == (("transformer.h.0.mlp.c_fc",),
                                                                 "transformer.h.0.mlp.c_proj", 128, "n_inner")
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2, enable_nested_tensor=False)
    assert [(s.owner, s.units) for s in find_structures(enc)] == [("layers.0", 24), ("layers.1", 24)]


def test_unknown_kind_is_refused_and_plain_layers_hold_no_structure():
    with pytest.raises(ValueError, match="structures must be drawn from mlp, heads"):
        find_structures(nn.Linear(2, 2), ("channels",))
    assert find_structures(nn.Linear(4, 8)) == []
    assert find_structures(nn.Sequential(nn.Linear(4, 8), nn.Conv1d(8, 8, 1), nn.Linear(8, 2))) == []


def test_sequential_mlps_of_a_hand_written_vit():
    from prunekit.zoo.vit import vit_mnist

    found = find_structures(vit_mnist())
    assert [(s.owner, s.producers, s.consumer, s.units) for s in found][:1] == [
        ("1.mlp", ("1.mlp.0",), "1.mlp.2", 128)]
    assert len(found) == 4
    (s,) = find_structures(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 2)))
    assert (s.owner, s.producers, s.consumer, s.units) == ("", ("0",), "3", 8)


def test_bert_gpt2_and_torch_attention_heads():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                                          num_hidden_layers=1))
    (s,) = find_structures(bert, ("heads",))
    p = "encoder.layer.0.attention."
    assert (s.owner, s.producers, s.kv_producers, s.consumer) == (
        p[:-1], (p + "self.query",), (p + "self.key", p + "self.value"), p + "output.dense")
    assert (s.units, s.unit_size, s.q_per_kv, s.fused, s.attributes_at, s.config_key) == (4, 8, 1, 1, p + "self", None)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=50))
    (s,) = find_structures(gpt2, ("heads",))
    assert (s.owner, s.producers, s.kv_producers, s.consumer) == (
        "transformer.h.0.attn", ("transformer.h.0.attn.c_attn",), (), "transformer.h.0.attn.c_proj")
    assert (s.units, s.unit_size, s.fused, s.config_key) == (2, 16, 3, None)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 1, enable_nested_tensor=False)
    (s,) = find_structures(enc, ("heads",))
    assert (s.owner, s.producers, s.consumer, s.units, s.unit_size, s.fused) == (
        "layers.0.self_attn", ("layers.0.self_attn",), "layers.0.self_attn.out_proj", 2, 8, 3)
    from prunekit.zoo.vit import vit_mnist

    assert [(s.owner, s.units) for s in find_structures(vit_mnist(depth=2), ("heads",))] == [("1.attn", 4), ("2.attn", 4)]


def test_attention_whose_widths_do_not_add_up_is_not_a_structure():
    class Odd(nn.Module):  # q/k/v/o names and a head_dim, but o reads a different width than q writes
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.o_proj, self.head_dim = nn.Linear(4, 8), 4

    class Fused(nn.Module):  # c_attn is not three parts of c_proj's input
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj, self.head_dim = nn.Linear(8, 16), nn.Linear(8, 8), 4

    assert find_structures(Odd(), ("heads",)) == [] and find_structures(Fused(), ("heads",)) == []
