"""The walk follows each tensor's channel axis: channels-last Linears after a permute, a
ConvNeXt-style block whose LayerNorm keeps the stream, reductions that move the axis."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.channel_budget import macs
from prunekit.structures.channels_graph import find_channel_groups

X = torch.randn(2, 1, 6, 6)


class ChannelsLast(nn.Module):
    """conv -> permute to [N, H, W, C] -> Linear over C -> GELU -> Linear -> permute back -> conv."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4) if norm else nn.Identity()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        y = self.down(torch.nn.functional.gelu(self.up(self.norm(h.permute(0, 2, 3, 1)))))
        return self.head(h + y.permute(0, 3, 1, 2))


def _roles(group):
    return [(m.module, m.role) for m in group.members]


def test_channels_last_linears_couple_with_the_convs_through_permutes():
    g = find_channel_groups(ChannelsLast(), X)
    assert [_roles(grp) for grp in g.groups] == [
        [("stem", "out"), ("up", "in"), ("down", "out"), ("head", "in")],  # the residual stream
        [("up", "out"), ("down", "in")]]
    by_hand = 36 * 9 * 4 + 36 * 4 * 8 * 2 + 36 * 4 * 2  # stem, up and down on 36 tokens, head
    assert macs(g) == by_hand and macs(g, [1, 2]) == 36 * 9 * 3 + 36 * 3 * 6 * 2 + 36 * 3 * 2


def test_layernorm_over_the_channels_freezes_the_stream_only():
    g = find_channel_groups(ChannelsLast(norm=True), X)
    assert [_roles(grp) for grp in g.groups] == [[("up", "out"), ("down", "in")]]


def test_silent_channels_last_units_go_with_the_output_unchanged():
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    with torch.no_grad():
        model.up.weight[[1, 5]] = 0  # hidden units 1 and 5 write zero
        model.up.bias[[1, 5]] = 0
        for layer in (model.stem, model.down):  # stream channel 2: zero from both writers
            layer.weight[2] = 0
            layer.bias[2] = 0
        before = model(X)
    result = pk.prune_channels(model, [X], ratio=0.25, score="l2", refine="lstsq", damp=0.0)
    assert [r.removed for r in result.reports] == [[2], [1, 5]]
    assert model.up.out_features == 6 and model.up.in_features == model.head.in_channels == 3
    torch.testing.assert_close(model(X), before, rtol=1e-4, atol=1e-5)


class TokenMean(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2)
        self.dim = dim

    def forward(self, x):  # x: [N, T, 3]
        return self.b(self.a(x).mean(self.dim))


def test_a_mean_over_tokens_keeps_the_channels_and_over_channels_is_refused():
    x = torch.randn(2, 7, 3)
    g = find_channel_groups(TokenMean(1), x)
    assert [_roles(grp) for grp in g.groups] == [[("a", "out"), ("b", "in")]]
    with pytest.raises(ValueError, match="mixes channels with other axes"):
        find_channel_groups(TokenMean(2), torch.randn(2, 5, 3))
