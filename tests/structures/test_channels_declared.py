"""Modules torch.fx cannot trace: refused with the module named and both fixes; ``passthrough=``
declares one that maps channel c to channel c, whose channels can then go."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.channels_graph import find_channel_groups
from tests.helpers.cnn_toys import Branchy, same, snapshot

X = torch.randn(2, 1, 8, 8)


def test_untraceable_module_is_named_with_both_fixes_and_the_model_left():
    model = Branchy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot trace gate .*exclude=\['gate'\].*passthrough=\['gate'\]"):
        pk.prune_channels(model, [X], ratio=0.5)
    assert same(model, snap)


def test_excluded_untraceable_module_keeps_the_channels_around_it():
    with pytest.raises(ValueError, match="no channel group"):
        pk.prune_channels(Branchy(), [X], ratio=0.5, exclude=["gate"])


def test_declared_passthrough_couples_its_input_and_output_channels():
    g = find_channel_groups(Branchy(), X, passthrough=["gate"])
    assert [[(m.module, m.role) for m in grp.members] for grp in g.groups] == [[("stem", "out"), ("head", "in")]]


def test_declared_passthrough_prunes_silent_channels_with_the_output_unchanged():
    torch.manual_seed(0)
    model = Branchy().eval()
    with torch.no_grad():
        model.stem.weight[[0, 2]] = 0
        model.stem.bias[[0, 2]] = 0
        before = model(X)
    result = pk.prune_channels(model, [X], ratio=0.5, score="l2", passthrough=["gate"])
    assert result.reports[0].removed == [0, 2] and model.stem.out_channels == model.head.in_channels == 2
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-6)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.scale = nn.Module()
        self.scale.register_parameter("gamma", nn.Parameter(torch.ones(4)))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.stem(x) * self.scale.gamma.view(1, -1, 1, 1))


@pytest.mark.parametrize("passthrough,error,match", [
    (["scale"], ValueError, "scale holds 'gamma'.*exclude it instead"),
    (["gat"], ValueError, "no module 'gat'"),
    ("scale", TypeError, "passthrough must be a list of module names"),
])
def test_bad_passthrough_raises_and_leaves_the_model(passthrough, error, match):
    model = Scaled()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        pk.prune_channels(model, [X], ratio=0.5, passthrough=passthrough)
    assert same(model, snap)


class Pick(nn.Module):
    """Untraceable; keeps channels one-to-one but halves the image (fine), or drops channels (refused)."""

    def __init__(self, channels: bool) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x):
        if self.channels:
            return x[:, :2] if x.sum() > 0 else x[:, 2:]
        return x[:, :, ::2, ::2] if x.sum() > 0 else x[:, :, 1::2, 1::2]


def test_passthrough_may_change_the_image_but_not_the_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Pick(channels=False), nn.Conv2d(4, 2, 1))
    assert [g.count for g in find_channel_groups(model, X, passthrough=["1"]).groups] == [4]
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Pick(channels=True), nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="declared passthrough, but its output .* does not keep the 4 channels"):
        pk.prune_channels(model, [X], ratio=0.5, passthrough=["1"])
