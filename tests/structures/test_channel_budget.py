"""Multiply-adds from the traced graph against ones counted from real forward shapes; FLOPs targets."""
import pytest
import torch
from torch import nn

from prunekit.structures.channel_budget import flops_counts, macs, ratio_counts
from prunekit.structures.channels_graph import find_channel_groups
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from prunekit.zoo.models import resnet_mnist
from tests.helpers.cnn_toys import ConcatSE

X = torch.randn(2, 1, 28, 28)


def _counted(model: nn.Module) -> int:
    """Multiply-adds per sample from each layer's real output shape (hooks, no graph)."""
    total = []

    def hook(m, args, out):
        if isinstance(m, nn.Conv2d):
            total.append(out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        else:
            total.append(m.in_features * m.out_features)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(X[:1])
    for h in hs:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("factory", [lambda: resnet_mnist(width=4), lambda: mobilenet_v1_mnist(), ConcatSE])
def test_dense_macs_match_real_shapes(factory):
    model = factory().eval()
    assert macs(find_channel_groups(model, X)) == _counted(model)


def test_flops_target_is_met_by_the_smallest_ratio():
    g = find_channel_groups(resnet_mnist(width=8), X)
    dense = macs(g)
    for target in (0.3, 0.5):
        counts = flops_counts(g, target)
        # brute force: the first ratio on a fine grid whose counts reach the target
        first = next(c for r in range(1, 1000) if 1 - macs(g, c := ratio_counts(g, r / 1000)) / dense >= target)
        assert counts == first and 1 - macs(g, counts) / dense >= target


def test_unreachable_flops_raise():
    g = find_channel_groups(resnet_mnist(width=4), X)
    with pytest.raises(ValueError, match="flops=0.999 cannot be reached"):
        flops_counts(g, 0.999)
