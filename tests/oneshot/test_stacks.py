"""Which blocks one-shot pruning calibrates by default: every stack's, in the order the
forward calls the stacks (toy models whose forward is written out, and T5 / Whisper / Bart
from configs)."""
import pytest
import torch
from torch import nn

from prunekit.oneshot.stacks import block_lists, find_stacks


class Experts(nn.Module):
    """A block holding a list of its own: the sum of two experts."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        return sum(e(x) for e in self.experts)


class TwoStacks(nn.Module):
    """``first`` is registered before ``second`` but run after it; ``experts`` lists inside
    the blocks and a list of embeddings are not stacks; ``spare`` is never run."""

    def __init__(self):
        super().__init__()
        self.first = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2))
        self.second = nn.ModuleList(Experts() for _ in range(3))
        self.tables = nn.ModuleList(nn.Embedding(5, 4) for _ in range(2))
        self.spare = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for block in self.second:
            x = block(x)
        for block in self.first:
            x = block(x)
        return x


def test_outermost_lists_holding_prunable_layers_are_stacks():
    assert [n for n, _ in block_lists(TwoStacks())] == ["first", "second", "spare"]


def test_stacks_in_call_order_and_the_unused_one_left_out():
    names = [n for n, _ in find_stacks(TwoStacks(), call=((torch.randn(2, 4),), {}))]
    assert names == ["second.0", "second.1", "second.2", "first.0", "first.1"]


class Alternating(nn.Module):
    """Attention and MLP sub-blocks in two lists, run alternately (one chain)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for a, m in zip(self.attn, self.mlp):
            x = m(a(x))
        return x


def test_two_lists_run_alternately_interleave():
    names = [n for n, _ in find_stacks(Alternating(), call=((torch.randn(2, 4),), {}))]
    assert names == ["attn.0", "mlp.0", "attn.1", "mlp.1"]


def test_without_data_the_stacks_in_registration_order():
    names = [n for n, _ in find_stacks(TwoStacks())]
    assert names == ["first.0", "first.1", "second.0", "second.1", "second.2", "spare.0", "spare.1"]


def test_given_names_a_sequential_and_a_plain_module_as_before():
    model = TwoStacks()
    assert [n for n, _ in find_stacks(model, ["first.1"])] == ["first.1"]
    assert [n for n, _ in find_stacks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))] == ["0", "1"]
    assert find_stacks(nn.Linear(2, 2))[0][0] == ""


@pytest.mark.parametrize("name,encoder,decoder", [
    ("tiny_t5", "encoder.block", "decoder.block"),
    ("tiny_whisper", "model.encoder.layers", "model.decoder.layers"),
    ("tiny_bart", "model.encoder.layers", "model.decoder.layers")])
def test_encoder_decoders_encoder_blocks_then_decoder_blocks(name, encoder, decoder):
    pytest.importorskip("transformers")
    from helpers import encdec_toys

    model = getattr(encdec_toys, name)()
    (args, kwargs) = ((), encdec_toys.encdec_batches(model, n=1)[0])
    expected = [f"{encoder}.0", f"{encoder}.1", f"{decoder}.0", f"{decoder}.1"]
    assert [n for n, _ in find_stacks(model, call=(args, kwargs))] == expected
    assert [n for n, _ in find_stacks(model)] == expected
