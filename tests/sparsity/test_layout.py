import torch
from torch import nn

from prunekit.layers import input_columns
from prunekit.sparsity.layout import from_matrix, to_matrix


def test_round_trip_conv_and_linear():
    for shape in [(5, 7), (4, 6, 3, 3), (4, 6, 5)]:
        w = torch.randn(shape)
        assert torch.equal(from_matrix(to_matrix(w), w.shape), w)


def test_conv_columns_are_channel_fastest():
    w = torch.zeros(1, 4, 2, 2)
    w[0, 1, 0, 0] = 1.0  # channel 1 at kernel position 0 -> column 1
    w[0, 2, 1, 1] = 2.0  # channel 2 at kernel position 3 -> column 3*4+2
    m = to_matrix(w)
    assert m[0, 1] == 1.0 and m[0, 14] == 2.0


def test_unfolded_inputs_reproduce_conv_and_linear_outputs():
    torch.manual_seed(0)
    for conv, x in [
        (nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), torch.randn(2, 3, 9, 9)),
        (nn.Conv1d(3, 5, 3, padding=2, dilation=2, bias=False), torch.randn(2, 3, 11)),
    ]:
        y = conv(x)
        cols = input_columns(conv, x)
        out = cols @ to_matrix(conv.weight).T
        expected = y.flatten(2).transpose(1, 2).reshape(-1, 5)
        assert torch.allclose(out, expected, atol=1e-5)
    lin = nn.Linear(6, 4, bias=False)
    x = torch.randn(2, 3, 6)
    assert torch.allclose(input_columns(lin, x) @ lin.weight.T, lin(x).reshape(-1, 4), atol=1e-6)
