"""Units of group pruning: norms and sizes against a brute-force walk of the graph's members,
masks, the one-unit floor, and the FLOPs prefix against a linear scan."""
import pytest
import torch
from torch import nn

from prunekit.training.group_sets import build
from helpers.group_toys import cnn, data, mlp


def brute_owned(model, graph):
    """Every unit's owned entries, gathered member by member, channel by channel."""
    mods = dict(model.named_modules())
    out = []
    for group in graph.groups:
        for c in range(group.count):
            parts = []
            for m in group.members:
                if m.role == "in":
                    continue
                mod = mods[m.module]
                for i in m.index[c].tolist():
                    parts.append(mod.weight.detach()[i].reshape(-1))
                    if mod.bias is not None:
                        parts.append(mod.bias.detach()[i].reshape(1))
            out.append(torch.cat(parts))
    return out


def test_channel_norms_and_sizes_match_a_brute_force_walk():
    model = cnn()
    g = build(model, "channels", data("cnn")[0][:2])
    owned = brute_owned(model, g.graph)
    assert g.units == len(owned) == sum(gr.count for gr in g.graph.groups)
    assert g.sizes.tolist() == [float(len(v)) for v in owned]
    expect = torch.stack([v.double().pow(2).sum() for v in owned])
    torch.testing.assert_close(g.sq_norms(), expect, rtol=1e-12, atol=0)


def test_masks_zero_a_units_owned_entries_and_its_readers_columns():
    model = cnn()
    g = build(model, "channels", data("cnn")[0][:2])
    removed = torch.zeros(g.units, dtype=torch.bool)
    removed[1] = True  # channel 1 of the first group (a, b concatenated, bn, SE, conv readers)
    keep = g.keep(removed)
    mods = dict(model.named_modules())
    expect = 0
    group, c = g.graph.groups[0], 1
    for m in group.members:
        mod = mods[m.module]
        per = mod.weight.numel() // mod.weight.shape[0 if m.role != "in" else 1]
        expect += per * m.index.shape[1] + (mod.bias is not None and m.role != "in")
        for i in m.index[c].tolist():
            sl = keep[f"{m.module}.weight"][i] if m.role != "in" else keep[f"{m.module}.weight"][:, i]
            assert not sl.any()
    assert sum(int((~k).sum()) for k in keep.values()) == expect


def test_mlp_units_are_producer_rows_and_biases_read_by_consumer_columns():
    model = mlp()
    g = build(model, "mlp")
    assert [(s.name, s.count) for s in g.sites] == [("1", 12), ("2", 12)]
    assert g.sizes.tolist() == [9.0] * 24  # 8 inputs + a bias per hidden neuron
    removed = torch.zeros(24, dtype=torch.bool)
    removed[14] = True  # neuron 2 of block 2
    keep = g.keep(removed)
    assert not keep["2.fc1.weight"][2].any() and not keep["2.fc1.bias"][2] and not keep["2.fc2.weight"][:, 2].any()
    assert sum(int((~k).sum()) for k in keep.values()) == 9 + 8


def test_every_site_keeps_one_unit_and_ties_go_by_index():
    g = build(mlp(), "mlp")
    scores = torch.zeros(g.units, dtype=torch.float64)
    order = g.order(scores)
    assert order == [u for u in range(24) if u not in (11, 23)]
    chosen = g.select(scores, 0.99, "groups")  # round(0.99 * 24) = 24 > 22 allowed: the floor caps it
    assert int(chosen.sum()) == 22 and not chosen[11] and not chosen[23]
    with pytest.raises(ValueError, match="must keep one"):
        g.check_target(0.99, "groups", "target")


def test_flops_selection_is_the_shortest_prefix_reaching_the_target():
    g = build(cnn(), "channels", data("cnn")[0][:2])
    scores = g.scores(torch.zeros(g.units, dtype=torch.bool))
    ranked = g.order(scores)
    for target in (0.2, 0.5, 0.7):
        n = 0
        while True:  # linear scan
            probe = torch.zeros(g.units, dtype=torch.bool)
            probe[ranked[:n]] = True
            if g.flops_removed(probe) >= target:
                break
            n += 1
        chosen = g.select(scores, target, "flops")
        assert int(chosen.sum()) == n and chosen[ranked[:n]].all()


def test_bad_groups_raise_and_leave_the_model():
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="groups must be one of"):
        build(model, "heads")
    with pytest.raises(ValueError, match="example="):
        build(model, "channels")
    with pytest.raises(ValueError, match="no MLP found"):
        build(model, "mlp")
    with pytest.raises(ValueError, match="belong to groups='channels'"):
        build(mlp(), "mlp", example=torch.zeros(1, 6))
    build(model, "channels", data("cnn")[0][:2])  # traced in eval mode: BatchNorm statistics stay
    assert model.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="no channel group"):
        build(nn.Sequential(nn.Conv2d(1, 2, 3)), "channels", torch.zeros(1, 1, 5, 5))


def test_attention_heads_are_refused_during_training_and_excluding_them_keeps_the_mlp_units():
    from prunekit.zoo.vit import vit_mnist
    torch.manual_seed(0)
    model = vit_mnist(dim=8, depth=1, heads=2, mlp=12)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"1.attn: attention heads are not pruned during training.*exclude=\['1.attn'\]"):
        build(model, "channels", x)
    g = build(model, "channels", x, exclude=["1.attn"])
    assert [(s.name, s.count) for s in g.sites] == [("1.mlp.0", 12)]
