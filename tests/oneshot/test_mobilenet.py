"""The MobileNetV1-style zoo CNN: depthwise-separable blocks, prunable per depthwise group."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.blocks import find_blocks
from prunekit.zoo.mobilenet import BLOCKS, mobilenet_v1_mnist


def test_shapes_and_depthwise_blocks():
    model = mobilenet_v1_mnist(0.25)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert len(find_blocks(model)) == len(BLOCKS) + 2  # stem, blocks, head
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(convs) == 1 + 2 * len(BLOCKS)
    assert len(depthwise) == len(BLOCKS)
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [16, 32, 32, 64, 64, 128, 128]


@pytest.mark.parametrize("width", [0, -1, 5])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        mobilenet_v1_mnist(width)


def test_unstructured_prunes_depthwise_kernels_per_channel():
    torch.manual_seed(0)
    model = mobilenet_v1_mnist(0.25).eval()
    pk.prune(model, sparsity=0.5, method="magnitude", exclude=r"^0\.", progress=False)
    dw = model.get_submodule("1.0").weight  # 8 channels, 3x3 each: round(0.5 * 9) = 4 or 5 zeros per kernel
    zeros = (dw.reshape(8, 9) == 0).sum(1)
    assert zeros.min() >= 4 and zeros.max() <= 5
    assert int((model.get_submodule("1.3").weight == 0).sum()) == 16 * 8 // 2
    assert int((model.get_submodule("0.0").weight == 0).sum()) == 0  # the stem, excluded
