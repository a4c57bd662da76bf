"""The small MNIST ViT of the zoo: shapes, its attention is prunable end to end."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.blocks import find_blocks
from prunekit.zoo.vit import vit_mnist


def test_shapes_blocks_and_parameters():
    model = vit_mnist(dim=16, depth=2, heads=2, mlp=32, patch=7)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert len(find_blocks(model)) == 4  # embedding, 2 encoder blocks, head
    assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 2
    # conv 16*49+16, pos 16*16, per block: 2 LN (64) + MHA (3*16*16+48 + 16*16+16) + MLP (16*32+32 + 32*16+16)
    block = 64 + (768 + 48 + 256 + 16) + (512 + 32 + 512 + 16)
    assert sum(p.numel() for p in model.parameters()) == 800 + 256 + 2 * block + 32 + 170


def test_patch_must_divide_the_image():
    with pytest.raises(ValueError, match="patch"):
        vit_mnist(patch=5)


def test_two_four_with_snows_prunes_every_attention_projection():
    torch.manual_seed(0)
    model = vit_mnist(dim=16, depth=1, heads=2, mlp=32, patch=7).eval()
    keys = set(model.state_dict())
    result = pk.prune(model, [torch.randn(8, 1, 28, 28)], pattern="2:4", method="sparsegpt", refine="snows",
                      refine_options={"k": 1, "max_cg": 2}, exclude=r"^0\.", progress=False)
    assert sorted(r.name for r in result.layers) == sorted(
        [f"1.attn.in_proj_weight[{u}]" for u in "qkv"] + ["1.attn.out_proj.weight", "1.mlp.0", "1.mlp.2"])
    w = model.get_submodule("1.attn").in_proj_weight
    assert int((w.reshape(-1, 4) != 0).sum(1).max()) == 2
    assert int((w == 0).sum()) == w.numel() // 2
    assert set(model.state_dict()) == keys
