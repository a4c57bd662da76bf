"""Multiply-adds from the traced graph against ones counted from real forward shapes; FLOPs targets."""
import pytest
import torch
from torch import nn

from prunekit.structures.channel_budget import flops_counts, macs, params, ratio_counts, uniform_counts
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


@pytest.mark.parametrize("exclude", ["^0\\.", "fc|^2\\.conv1"])
def test_excluded_layers_still_count_in_the_totals(exclude):
    model = resnet_mnist(width=4).eval()
    g = find_channel_groups(model, X, exclude=exclude)
    assert macs(g) == _counted(model)
    assert params(g) == _conv_linear_params(model)


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


def _conv_linear_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())


@pytest.mark.parametrize("factory", [lambda: resnet_mnist(width=4), lambda: mobilenet_v1_mnist(), ConcatSE])
def test_params_from_the_graph_match_the_pruned_modules(factory):
    import prunekit as pk
    torch.manual_seed(0)
    model = factory().eval()
    g = find_channel_groups(model, X)
    assert params(g) == _conv_linear_params(model)
    result = pk.prune_channels(model, [X], params=0.3, refine=None, recalibrate_bn=False)
    counts = [r.units_before - r.units_after for r in result.reports]
    assert params(g, counts) == _conv_linear_params(model)
    assert 1 - params(g, counts) / params(g) >= 0.3


def test_params_target_is_met_by_the_smallest_ratio():
    g = find_channel_groups(resnet_mnist(width=8), X)
    dense = params(g)
    counts = uniform_counts(g, "params", 0.4)
    first = next(c for r in range(1, 1000) if 1 - params(g, c := ratio_counts(g, r / 1000)) / dense >= 0.4)
    assert counts == first


def _chain() -> nn.Sequential:
    """Two groups of 4 channels whose l2 scores (squared filter norms), divided by their group's mean,
    are [0.1, 0.1, 1.9, 1.9] and [1, 1, 1, 1]."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.1, 0.1, 1.9, 1.9]).sqrt().view(4, 1, 1, 1))
        model[2].weight.zero_()
        model[2].weight[:, 0] = 0.5  # every filter's squared norm: 4 * 0.25 = 1
    return model.eval()


@pytest.mark.parametrize("floor,removed", [(0.5, [[0, 1], []]), (0.75, [[0], [0]])])
def test_global_ratio_ranks_normalised_scores_across_groups_above_the_floor(floor, removed):
    import prunekit as pk
    result = pk.prune_channels(_chain(), [torch.randn(2, 1, 4, 4)], ratio=0.25, budget="global", floor=floor,
                               refine=None, recalibrate_bn=False)
    assert [r.removed for r in result.reports] == removed


def test_global_flops_reaches_the_target_keeping_every_floor():
    import prunekit as pk
    torch.manual_seed(0)
    model = resnet_mnist(width=8).eval()
    g = find_channel_groups(model, X)
    result = pk.prune_channels(model, [X], flops=0.4, budget="global", floor=0.4, score="l2", refine=None,
                               recalibrate_bn=False)
    counts = [r.units_before - r.units_after for r in result.reports]
    assert 1 - macs(g, counts) / macs(g) >= 0.4 and result.flops_removed >= 0.4
    assert all(r.units_after >= 0.4 * r.units_before for r in result.reports)
    assert len({r.units_after / r.units_before for r in result.reports}) > 1  # not a uniform ratio
    assert model(X).shape == (2, 10)


def test_global_budget_out_of_reach_of_the_floors_raises_and_leaves_the_model():
    import prunekit as pk
    from tests.helpers.cnn_toys import same, snapshot
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="floor=0.9 keeps too much"):
        pk.prune_channels(model, [X], flops=0.5, budget="global", floor=0.9)
    assert same(model, snap)


def test_multiple_of_keeps_multiples_and_still_meets_the_target():
    g = find_channel_groups(mobilenet_v1_mnist(width=0.5), X)
    dense = macs(g)
    counts = uniform_counts(g, "flops", 0.5, multiple_of=8)
    kept = [grp.count - n for grp, n in zip(g.groups, counts)]
    assert all(k % 8 == 0 or n == 0 for k, n in zip(kept, counts)), kept
    assert 1 - macs(g, counts) / dense >= 0.5
    # brute force over a fine grid of ratios: the first whose rounded counts reach the target
    first = next(c for r in range(1, 1000)
                 if 1 - macs(g, c := ratio_counts(g, r / 1000, multiple_of=8)) / dense >= 0.5)
    assert counts == first


def test_multiple_of_leaves_small_groups_whole_and_rounds_to_the_nearest():
    g = find_channel_groups(mobilenet_v1_mnist(width=0.25), X)  # stem 8, then 16, 32, 64, 128
    counts = ratio_counts(g, 0.3, multiple_of=8)
    for grp, n in zip(g.groups, counts):
        if grp.count <= 8:
            assert n == 0
        else:
            plain = int(0.3 * grp.count + 0.5)
            assert (grp.count - n) % 8 == 0 and abs(n - plain) <= 4
