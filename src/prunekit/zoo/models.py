"""Small reference CNNs for MNIST, built as ``nn.Sequential`` of blocks.

Being sequences of blocks lets one-shot pruning calibrate block by block, feeding each block
the output of the already-pruned blocks before it.
"""
from __future__ import annotations

from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Head(nn.Module):
    """Global average pool and a linear classifier (``fc``, excluded from pruning by default)."""

    def __init__(self, channels: int, classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


def small_cnn(width: int = 32, classes: int = 10) -> nn.Sequential:
    """A 4-conv MNIST CNN (~60k parameters at width 32): the demo's model."""
    w = width
    return nn.Sequential(
        conv_bn_relu(1, w),
        conv_bn_relu(w, w, stride=2),
        conv_bn_relu(w, 2 * w),
        conv_bn_relu(2 * w, 2 * w, stride=2),
        Head(2 * w, classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, plus a (1x1 conv) shortcut, then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_mnist(width: int = 16, blocks_per_stage: int = 2, classes: int = 10) -> nn.Sequential:
    """A ResNet-20-style network for 28x28 inputs: stem, 3 stages of basic blocks, head."""
    layers: list[nn.Module] = [conv_bn_relu(1, width)]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for i in range(blocks_per_stage):
            layers.append(BasicBlock(c_in, c_out, stride=2 if (stage > 0 and i == 0) else 1))
            c_in = c_out
    layers.append(Head(c_in, classes))
    return nn.Sequential(*layers)
