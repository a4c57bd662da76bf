"""A MobileNetV1-style CNN for 28x28 MNIST: a conv stem, then depthwise-separable blocks.

Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications": each block is a depthwise 3x3 convolution (one filter per channel, ``groups =
channels``) + BatchNorm + ReLU, then a pointwise 1x1 convolution + BatchNorm + ReLU. Channel
widths are the paper's (32, 64, ..., 1024) times ``width``, with fewer blocks, fitting 28x28
inputs. An ``nn.Sequential`` of blocks, so one-shot pruning calibrates it block by block.
"""
from __future__ import annotations

from torch import nn

from .models import Head, conv_bn_relu

# (output channels at width 1, stride) of each depthwise-separable block (MobileNetV1's first 7,
# then its last: 28 -> 14 -> 7 -> 4 spatially)
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))


def depthwise_separable(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


def mobilenet_v1_mnist(width: float = 0.25, classes: int = 10) -> nn.Sequential:
    """MobileNetV1-style network for 1x28x28 images (~75k parameters at ``width=0.25``)."""
    if not 0 < width <= 4:
        raise ValueError(f"width must be in (0, 4], got {width!r}")
    c = max(8, round(32 * width))
    layers: list[nn.Module] = [conv_bn_relu(1, c)]
    for channels, stride in BLOCKS:
        c_out = max(8, round(channels * width))
        layers.append(depthwise_separable(c, c_out, stride))
        c = c_out
    layers.append(Head(c, classes))
    return nn.Sequential(*layers)
