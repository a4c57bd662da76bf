"""prune_channels on the zoo's ViT: MLP hidden units and nn.MultiheadAttention heads as groups,
the residual stream left alone; silent units removed with the output unchanged, multiply-adds
against a hand count, the out_proj refit against a dense solve."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.channel_budget import macs
from prunekit.structures.channels_graph import find_channel_groups
from prunekit.structures.mha import PrunedMultiheadAttention
from prunekit.zoo.vit import vit_mnist
from tests.helpers.cnn_toys import same, snapshot

E, H, MLP, T = 16, 4, 24, 49  # embed width, heads, MLP width, tokens (7x7 patches of 4x4)
X = torch.randn(3, 1, 28, 28)


def _vit(depth: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    return vit_mnist(dim=E, depth=depth, heads=H, mlp=MLP).eval()


def test_groups_are_heads_and_mlp_units_and_the_stream_stays():
    g = find_channel_groups(_vit(), X)
    assert [(grp.name, grp.count) for grp in g.groups] == [("1.attn", H), ("1.mlp.0", MLP), ("2.attn", H),
                                                            ("2.mlp.0", MLP)]
    heads = g.groups[0]
    assert [(m.module, m.role, tuple(m.index.shape)) for m in heads.members] == [("1.attn", "heads", (H, 12)),
                                                                                ("1.attn.out_proj", "in", (H, 4))]
    # head 1: q rows 4..7, k rows 20..23, v rows 36..39 of in_proj_weight; out_proj columns 4..7
    assert heads.members[0].index[1].tolist() == [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]
    assert heads.members[1].index[1].tolist() == [4, 5, 6, 7]
    frozen = {m.module for grp in g.frozen for m in grp.members}
    assert {"0.proj", "3.fc", "1.attn.out_proj", "1.mlp.2"} <= frozen  # the residual stream's writers and readers


def test_multiply_adds_match_a_hand_count_before_and_after():
    g = find_channel_groups(_vit(), X)
    hd = E // H

    def by_hand(heads: int, mlp: int) -> int:
        block = T * E * 3 * heads * hd + 2 * T * T * heads * hd + T * heads * hd * E + T * E * mlp * 2
        return E * 16 * T + 2 * block + E * 10  # patch conv (1 channel, 4x4), two blocks, head
    assert macs(g) == by_hand(H, MLP)
    assert macs(g, [1, 6, 1, 6]) == by_hand(H - 1, MLP - 6)
    # excluded attentions keep their heads but still count: the total is the same network's
    fixed = find_channel_groups(_vit(), X, exclude="attn")
    assert [grp.name for grp in fixed.groups] == ["1.mlp.0", "2.mlp.0"]
    assert macs(fixed) == by_hand(H, MLP) and macs(fixed, [6, 6]) == by_hand(H, MLP - 6)


def test_silent_heads_and_units_go_first_and_the_output_is_unchanged():
    model = _vit()
    with torch.no_grad():
        for block in (model[1], model[2]):
            for part in range(3):  # heads 1 and 3: q, k and v rows zero, so they write zero
                for h in (1, 3):
                    rows = slice(part * E + h * 4, part * E + h * 4 + 4)
                    block.attn.in_proj_weight[rows] = 0
                    block.attn.in_proj_bias[rows] = 0
            block.mlp[0].weight[::2] = 0  # even MLP units: GELU(0) = 0
            block.mlp[0].bias[::2] = 0
        before = model(X)
    keys = set(model.state_dict())
    result = pk.prune_channels(model, [X], ratio=0.5, score="l2", refine=None)
    assert [r.removed for r in result.reports] == [[1, 3], list(range(0, MLP, 2))] * 2
    assert isinstance(model[1].attn, PrunedMultiheadAttention) and model[1].attn.num_heads == 2
    assert model[1].attn.in_proj_weight.shape == (3 * 8, E) and model[1].attn.out_proj.in_features == 8
    assert model[1].mlp[0].out_features == model[1].mlp[2].in_features == MLP // 2
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)


def test_out_proj_refit_equals_a_dense_solve_on_the_attention_output():
    model = _vit(depth=1)
    calib = [torch.randn(4, 1, 28, 28) for _ in range(2)]
    dense = copy.deepcopy(model)
    dense[1].attn = PrunedMultiheadAttention.from_torch(dense[1].attn)
    seen = []
    hook = dense[1].attn.out_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, E).double()))
    with torch.no_grad():
        for x in calib:
            dense(x)
    hook.remove()
    inputs = torch.cat(seen)
    w, b = dense[1].attn.out_proj.weight.detach().double(), dense[1].attn.out_proj.bias.detach().double()
    result = pk.prune_channels(model, calib, ratio=0.5, score="l2", refine="lstsq", damp=0.0)
    kept = [h for h in range(H) if h not in result.reports[0].removed]
    cols = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in kept])
    design = torch.cat([inputs[:, cols], torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, inputs @ w.T + b).solution
    torch.testing.assert_close(model[1].attn.out_proj.weight.detach().double(), sol[:8].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].attn.out_proj.bias.detach().double(), sol[8], rtol=1e-4, atol=1e-4)


def test_global_params_budget_on_a_vit_runs_and_keeps_the_floor():
    model = _vit()
    result = pk.prune_channels(model, [X], params=0.3, budget="global", floor=0.5, score="wanda")
    assert all(r.units_after >= r.units_before / 2 for r in result.reports)
    assert result.params_after < 0.8 * result.params_before and model(X).shape == (3, 10)


def test_attention_prunekit_cannot_shrink_keeps_its_heads_and_bad_input_leaves_the_model():
    model = _vit()
    model[1].attn = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
    g = find_channel_groups(model, X)
    assert "1.attn" not in [grp.name for grp in g.groups] and "2.attn" in [grp.name for grp in g.groups]
    snap = snapshot(model)
    with pytest.raises(ValueError, match="score='bn' needs a BatchNorm"):
        pk.prune_channels(model, [X], ratio=0.5, score="bn")
    assert same(model, snap) and isinstance(model[2].attn, nn.MultiheadAttention)


def test_a_pruned_vit_prunes_again_through_the_drop_in():
    model = _vit()
    pk.prune_channels(model, [X], ratio=0.25, score="wanda")
    result = pk.prune_channels(model, [X], ratio=0.5, score="obs")
    assert [(r.kind, r.units_before, r.units_after) for r in result.reports] == [("heads", 3, 1), ("channels", 18, 9)] * 2
    assert model[1].attn.num_heads == 1 and model[1].attn.in_proj_weight.shape == (12, E) and model(X).shape == (3, 10)
