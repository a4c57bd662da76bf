
import pytest
import torch
from torch import nn

from prunekit.eval import perplexity


class Uniform(nn.Module):
    """Predicts every token with equal probability: perplexity = vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


class Oracle(nn.Module):
    """Knows the next token of a stream that counts 0, 1, 2, ... mod vocab."""

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, 10), -1e4)
        logits.scatter_(-1, ((input_ids + 1) % 10).unsqueeze(-1), 0.0)
        return logits


def test_uniform_and_perfect_models():
    tokens = torch.arange(1000) % 10
    assert perplexity(Uniform(10), tokens, seq_len=32) == pytest.approx(10.0)
    assert perplexity(Oracle(), tokens, seq_len=32) == pytest.approx(1.0, abs=1e-6)


def test_too_short_text_is_refused():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        perplexity(Uniform(10), torch.arange(10), seq_len=32)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(Uniform(10), torch.arange(10), seq_len=1)


def test_a_model_dispatched_with_accelerate_is_fed_where_it_runs():
    """cpu_offload leaves every weight on the meta device: the tokens go to the hooks' device."""
    import os
    import sys

    accelerate = pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    tokens = torch.randint(0, 100, (200,), generator=torch.Generator().manual_seed(0))
    expected = perplexity(tiny_llama(1), tokens, seq_len=32)
    model = accelerate.cpu_offload(tiny_llama(1), execution_device="cpu")
    assert model.lm_head.weight.is_meta
    assert perplexity(model, tokens, seq_len=32) == pytest.approx(expected, rel=1e-6)
