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
