"""Channel groups found from the torch.fx graph, checked by hand on small networks."""
import pytest
import torch

from prunekit.structures.channels_graph import find_channel_groups
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from prunekit.zoo.models import resnet_mnist, small_cnn
from tests.helpers.cnn_toys import Branchy, ConcatSE, Grouped

X = torch.randn(2, 1, 28, 28)


def _roles(group):
    return {(m.module, m.role) for m in group.members}


def test_resnet_stream_channels_are_coupled_across_blocks():
    g = find_channel_groups(resnet_mnist(width=4, blocks_per_stage=2), X)
    stream = next(grp for grp in g.groups if ("0.0", "out") in _roles(grp))
    # stem and both stage-1 blocks add into one stream; every conv reading it is a consumer
    assert _roles(stream) == {("0.0", "out"), ("1.conv2", "out"), ("2.conv2", "out"),
                              ("0.1", "bn"), ("1.bn2", "bn"), ("2.bn2", "bn"),
                              ("1.conv1", "in"), ("2.conv1", "in"), ("3.conv1", "in"), ("3.shortcut.0", "in")}
    assert stream.count == 4 and all(torch.equal(m.index[:, 0], torch.arange(4)) for m in stream.members)
    last = next(grp for grp in g.groups if ("7.fc", "in") in _roles(grp))
    assert {m for m, r in _roles(last) if r == "out"} == {"5.shortcut.0", "5.conv2", "6.conv2"}
    inner = [grp for grp in g.groups if len(grp.members) == 3]  # conv1 -> bn1 -> conv2 of each block
    assert len(inner) == 6 and len(g.groups) == 9
    assert [(m.module, m.role) for m in g.frozen[0].members] == [("0.0", "in")]  # the image's channel


def test_small_cnn_and_mobilenet_chains():
    g = find_channel_groups(small_cnn(width=8), X)
    assert [sorted(_roles(grp)) for grp in g.groups][0] == [("0.0", "out"), ("0.1", "bn"), ("1.0", "in")]
    assert [grp.count for grp in g.groups] == [8, 8, 16, 16]
    g = find_channel_groups(mobilenet_v1_mnist(), X)
    first = g.groups[0]  # stem -> depthwise (coupled through) -> pointwise
    assert _roles(first) == {("0.0", "out"), ("0.1", "bn"), ("1.0", "dw"), ("1.1", "bn"), ("1.3", "in")}
    assert len(g.groups) == 8 and g.layers["1.0"].kind == "dw"


def test_concat_offsets_squeeze_excitation_and_flatten_to_linear():
    g = find_channel_groups(ConcatSE(), X)
    a = next(grp for grp in g.groups if ("a", "out") in _roles(grp))
    b = next(grp for grp in g.groups if ("b", "out") in _roles(grp))
    # the gate multiplies the concatenation: se_expand's outputs join both branches
    assert torch.equal(next(m for m in a.members if m.module == "se_expand").index[:, 0], torch.arange(3))
    assert torch.equal(next(m for m in b.members if m.module == "conv").index[:, 0], torch.arange(3, 8))
    assert torch.equal(next(m for m in b.members if m.module == "bn").index[:, 0], torch.arange(3, 8))
    hidden = next(grp for grp in g.groups if ("se_reduce", "out") in _roles(grp))
    assert _roles(hidden) == {("se_reduce", "out"), ("se_expand", "in")}
    last = next(grp for grp in g.groups if ("conv", "out") in _roles(grp))
    fc = next(m for m in last.members if m.module == "fc")
    assert fc.index.shape == (6, 49) and torch.equal(fc.index[2], torch.arange(98, 147))


def test_grouped_conv_is_refused_by_name_and_can_be_excluded():
    with pytest.raises(ValueError, match=r"'mix'.*grouped convolution.*exclude"):
        find_channel_groups(Grouped(), X)
    g = find_channel_groups(Grouped(), X, exclude=["mix"])
    assert g.groups == [] and len(g.frozen) == 4  # stem in/out, head in/out: all touch the image, the output or mix


def test_untraceable_module_is_named_and_can_be_excluded():
    with pytest.raises(ValueError, match=r"cannot trace gate"):
        find_channel_groups(Branchy(), X)
    g = find_channel_groups(Branchy(), X, exclude="^gate$")
    assert g.groups == []  # stem's channels run into the opaque module: frozen


def test_unknown_module_is_named():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"module '1'.*Upsample"):
        find_channel_groups(model, X)


def test_module_called_twice_is_refused():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s, self.c = torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.c(self.c(self.s(x)))

    with pytest.raises(ValueError, match=r"'c'.*more than once"):
        find_channel_groups(Twice(), X)
