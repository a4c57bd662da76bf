"""prunekit.llm: calibration windows, decoder-layer blocks, early errors, HF round trip."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from helpers.llama_toys import tiny_llama  # noqa: E402
from prunekit.llm import check_seq_len, decoder_blocks, generate_sample, max_positions, text_calibration  # noqa: E402


class CharTokenizer:
    """A stand-in tokenizer: one token per character (ids below 100)."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors="pt"):
        ids = torch.tensor([[ord(c) % 100 for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_layers=3)


def test_text_calibration_cuts_consecutive_windows():
    text = "abcdefghij" * 10  # 100 tokens
    batches = text_calibration(CharTokenizer(), text, seq_len=16, n_sequences=5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(b["use_cache"] is False for b in batches)
    flat = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    assert torch.equal(flat, CharTokenizer()(text)["input_ids"][0, :80])


def test_text_calibration_warns_when_the_text_holds_fewer_sequences():
    with pytest.warns(UserWarning, match="only 6 sequences"):
        batches = text_calibration(CharTokenizer(), "x" * 100, seq_len=16, n_sequences=64)
    assert sum(len(b["input_ids"]) for b in batches) == 6


def test_text_shorter_than_one_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=256.*shorter seq_len"):
        text_calibration(CharTokenizer(), "too short", seq_len=256)


def test_seq_len_above_the_model_limit_is_a_clear_error(llama):
    assert max_positions(llama) == 64
    with pytest.raises(ValueError, match="above the model's limit of 64.*seq_len <= 64"):
        text_calibration(CharTokenizer(), "x" * 1000, seq_len=128, model=llama)
    with pytest.raises(ValueError, match="seq_len must be an integer"):
        check_seq_len(llama, 1)
    with pytest.raises(ValueError, match="n_sequences"):
        text_calibration(CharTokenizer(), "x" * 1000, seq_len=8, n_sequences=0)


def test_perplexity_refuses_a_seq_len_above_the_model_limit(llama):
    with pytest.raises(ValueError, match="above the model's limit"):
        pk.perplexity(llama, torch.randint(0, 100, (1000,)), seq_len=128)


def test_decoder_blocks_finds_the_layers_in_order(llama):
    assert decoder_blocks(llama) == ["model.layers.0", "model.layers.1", "model.layers.2"]


def test_a_model_without_locatable_layers_is_a_clear_error():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(num_hidden_layers=4)
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="could not locate the decoder layers of Flat.*blocks="):
        decoder_blocks(Flat())


def test_pruned_decoder_saves_as_a_plain_checkpoint_that_generates(llama, tmp_path):
    model = copy.deepcopy(llama)
    batches = text_calibration(CharTokenizer(), "the quick brown fox jumps over the lazy dog " * 20,
                               seq_len=32, n_sequences=8, batch_size=4, model=model)
    result = pk.prune(model, batches, pattern="2:4", method="sparsegpt", blocks=decoder_blocks(model), progress=False)
    assert len(result.layers) == 21 and abs(result.sparsity - 0.5) < 1e-9
    model.save_pretrained(tmp_path / "plain")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    for name, layer in pk.find_targets(back).items():
        assert torch.equal(layer.weight, model.get_submodule(name).weight)
        assert pk.check_nm(layer.weight != 0, pk.NM(2, 4))
    ids = batches[0]["input_ids"][:1, :8]
    assert torch.equal(back.generate(ids, max_new_tokens=5, do_sample=False),
                       model.generate(ids, max_new_tokens=5, do_sample=False))
    assert len(generate_sample(back, CharTokenizer(), "hello", max_new_tokens=5)) == 5


def test_a_gguf_marked_model_saves_as_a_plain_checkpoint(llama, tmp_path):
    """transformers keeps a model loaded from GGUF marked as quantized (its weights are
    dequantised floats) and refuses save_pretrained; as_plain_float removes the marker."""
    from types import SimpleNamespace

    from prunekit.llm import as_plain_float

    model = copy.deepcopy(llama)
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    as_plain_float(model).save_pretrained(tmp_path / "plain")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
