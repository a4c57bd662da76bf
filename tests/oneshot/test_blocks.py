import pytest
import torch
from torch import nn

from prunekit.oneshot.blocks import capture_inputs, execution_order, find_blocks, propagate, swapped_weights


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_find_blocks():
    assert [n for n, _ in find_blocks(Stack())] == ["layers.0", "layers.1", "layers.2"]
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert [n for n, _ in find_blocks(seq)] == ["0", "1"]
    assert find_blocks(nn.Linear(2, 2))[0][0] == ""


def test_chained_capture_equals_full_forward_block_by_block():
    torch.manual_seed(0)
    model = Stack().eval()
    calls = [((torch.randn(3, 4),), {}), ((torch.randn(5, 4),), {})]
    blocks = find_blocks(model)
    chained = capture_inputs(model, blocks[0][1], calls)
    for i, (_, block) in enumerate(blocks):
        direct = capture_inputs(model, block, calls)
        for (a, _), (b, _) in zip(chained, direct):
            assert torch.allclose(a[0], b[0], atol=1e-6)
        chained = propagate(block, chained)


def test_execution_order_and_swapped_weights():
    model = Stack()
    layers = {"head": model.head, "inp": model.inp}
    order, uncalled = execution_order(model, layers, (torch.randn(1, 4),), {})
    assert order == ["inp", "head"] and uncalled == []
    original = model.head.weight.data_ptr()
    with swapped_weights(layers, {"head": torch.zeros(2, 8)}):
        assert model.head.weight.abs().sum() == 0
    assert model.head.weight.data_ptr() == original


def test_shared_input_groups_on_a_decoder_layer():
    transformers = pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama
    from prunekit.oneshot.blocks import shared_input_groups

    model = tiny_llama(num_layers=1)
    layer = model.model.layers[0]
    layers = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    calls = [((), {"input_ids": torch.randint(0, 100, (2, 8))})]
    (args, kwargs), = capture_inputs(model, layer, calls)
    order, _ = execution_order(layer, layers, args, kwargs)
    groups, once = shared_input_groups(layer, layers, order, args, kwargs)
    assert once
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


class Keywords(nn.Module):
    """A model called with keywords only, as a mapping batch calls it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, *, features):
        return self.lin(features) * 2


def test_run_chain_takes_a_keyword_only_first_block():
    from prunekit.oneshot.blocks import run_chain

    model, x = Keywords(), torch.randn(3, 4)
    assert torch.equal(run_chain([model], (), {"features": x}), model(features=x))


def test_called_before_names_the_layers_run_before_a_block():
    from prunekit.oneshot.blocks import called_before

    model = Stack()
    layers = {"head": model.head, "inp": model.inp}
    assert called_before(model, model.layers[0], layers, (torch.randn(2, 4),), {}) == ["inp"]
    assert called_before(model, model.head, layers, (torch.randn(2, 4),), {}) == ["inp"]
