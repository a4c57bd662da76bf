"""A small Vision Transformer for 28x28 MNIST, built from ``nn.MultiheadAttention``.

The layout of torchvision's ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"):
a patch-embedding convolution, a learned position embedding, pre-norm encoder blocks (attention,
then a GELU MLP, each on a residual path) and a LayerNorm + linear head, here on mean-pooled
tokens instead of a class token. It is an ``nn.Sequential`` of blocks so one-shot pruning
calibrates it block by block; the attention is the stock module, as in torchvision and in every
``nn.TransformerEncoderLayer``.
"""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> ``dim``-wide tokens, plus a position embedding."""

    def __init__(self, dim: int, patch: int, image: int = 28, channels: int = 1) -> None:
        super().__init__()
        if image % patch:
            raise ValueError(f"patch must divide the image size {image}, got {patch}")
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TokenHead(nn.Module):
    """LayerNorm, mean over tokens, linear classifier (``fc``, left dense by default)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(1))


def vit_mnist(dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, patch: int = 4,
              classes: int = 10) -> nn.Sequential:
    """A ViT for 1x28x28 images (~140k parameters by default): patch embedding, ``depth``
    encoder blocks, head."""
    return nn.Sequential(PatchEmbed(dim, patch), *[EncoderBlock(dim, heads, mlp) for _ in range(depth)],
                         TokenHead(dim, classes))
