"""prune_channels end to end: exactness oracles, the least-squares refit against a dense solve,
smaller working models, and bad input that leaves the model as it was."""
import pytest
import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit.structures import channel_refit as refit_mod
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from prunekit.zoo.models import resnet_mnist, small_cnn
from prunekit.structures.channels_graph import find_channel_groups
from tests.helpers.cnn_toys import Branchy, ConcatSE, conv_pair, same, silence, snapshot

torch.manual_seed(0)
CALIB = [torch.randn(8, 1, 28, 28) for _ in range(2)]
X = torch.randn(4, 1, 28, 28)


def test_zero_channels_are_removed_first_and_the_output_is_unchanged():
    torch.manual_seed(0)
    model = resnet_mnist(width=4, blocks_per_stage=1).eval()
    graph = find_channel_groups(model, X)
    silent = {g: list(range(1, grp.count, 2)) for g, grp in enumerate(graph.groups)}  # odd channels output zero
    silence(model, graph, silent)
    before = model(X)
    result = pk.prune_channels(model, CALIB, ratio=0.5, score="l2", refine=None, recalibrate_bn=False)
    assert [r.removed for r in result.reports] == list(silent.values())
    assert model[0][0].out_channels == model[1].conv2.out_channels == model[2].conv1.in_channels == 2
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)


def test_lstsq_refit_equals_a_dense_solve_on_unfolded_inputs():
    model = conv_pair(bias=True)
    calib = [torch.randn(6, 3, 10, 10) for _ in range(2)]
    dense_w, dense_b = model[3].weight.detach().double().reshape(6, -1), model[3].bias.detach().double()
    with torch.no_grad():
        inputs = torch.cat([model[:3](x) for x in calib])
    pk.prune_channels(model, calib, ratio=0.5, score="bn", refine="lstsq", recalibrate_bn=False, damp=0.0)
    keep = torch.argsort(conv_pair().__getitem__(1).weight.detach(), stable=True)[4:].sort().values
    cols = F.unfold(inputs.double(), 3, padding=1).transpose(1, 2).reshape(-1, 72)
    target = cols @ dense_w.T + dense_b
    kept = cols.view(-1, 8, 9)[:, keep].reshape(-1, 36)
    design = torch.cat([kept, torch.ones(len(kept), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, target).solution
    torch.testing.assert_close(model[3].weight.detach().double().reshape(6, -1), sol[:36].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[3].bias.detach().double(), sol[36], rtol=1e-4, atol=1e-4)


def test_refit_beats_dropping_at_the_consumer():
    torch.manual_seed(1)
    model = small_cnn(width=8).eval()
    result = pk.prune_channels(model, CALIB, ratio=0.5, score="wanda", refine="lstsq")
    assert result.refits and all(fit <= drop * (1 + 1e-6) for drop, fit in result.refits.values())


@pytest.mark.parametrize("factory,score", [(lambda: resnet_mnist(width=4), "l2"),
                                           (lambda: mobilenet_v1_mnist(), "bn"),
                                           (lambda: small_cnn(width=8), "wanda"), (ConcatSE, "wanda")])
def test_pruned_models_run_and_are_smaller(factory, score):
    torch.manual_seed(0)
    model = factory().eval()
    keys = set(model.state_dict())
    result = pk.prune_channels(model, CALIB, flops=0.3, score=score)
    assert result.flops_removed >= 0.3 and result.params_after < result.params_before
    assert sum(p.numel() for p in model.parameters()) == result.params_after
    assert model(X).shape == (4, 10) and set(model.state_dict()) == keys and not model.training
    assert result.bn_batches == (2 if score != "wanda" or factory is not ConcatSE else 2)


def test_batchnorm_is_re_estimated_on_the_pruned_network():
    torch.manual_seed(0)
    model = small_cnn(width=8).eval()
    pk.prune_channels(model, CALIB, ratio=0.25, recalibrate_bn=True)
    bn = model[0][1]  # the first BatchNorm's inputs depend on no other BatchNorm
    with torch.no_grad():
        mean = torch.cat([model[0][0](x) for x in CALIB]).double().mean((0, 2, 3)).float()
    assert bn.num_features == 6
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [({"ratio": 1.0}, "ratio must be a number in"),
                                          ({"ratio": 0.5, "flops": 0.5}, "exactly one of"),
                                          ({"flops": 0.999}, "cannot be reached"),
                                          ({"ratio": 0.5, "score": "taylor"}, "score must be one of"),
                                          ({"ratio": 0.5, "params": 0.5}, "exactly one of"),
                                          ({"params": 0}, "params must be a number in"),
                                          ({"params": 0.999}, "params=0.999 cannot be reached"),
                                          ({"ratio": 0.5, "budget": "greedy"}, "budget must be one of"),
                                          ({"ratio": 0.5, "floor": 0.5}, "applies to budget='global'"),
                                          ({"ratio": 0.5, "budget": "global", "floor": 1.0}, "floor must be"),
                                          ({"ratio": 0.5, "refine": "snows", "refine_options": {"kk": 1}},
                                           "unknown snows option 'kk'"),
                                          ({"ratio": 0.5, "refine": "obs"}, "refine must be None"),
                                          ({"ratio": 0.5, "multiple_of": 0}, "multiple_of must be a whole number"),
                                          ({"ratio": 0.5, "multiple_of": 2.0}, "multiple_of must be a whole number"),
                                          ({"flops": 0.9, "multiple_of": 4}, r"keeping 4 channels \(multiple_of\)")])
def test_bad_targets_raise_and_leave_the_model(kwargs, match):
    model = resnet_mnist(width=4).eval()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pk.prune_channels(model, CALIB, **kwargs)
    assert same(model, snap)


def test_a_ratio_that_empties_a_group_names_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.ReLU(), torch.nn.Conv2d(1, 2, 3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^0: removing 1 of its 1 channels leaves none"):
        pk.prune_channels(model, CALIB, ratio=0.99)
    assert same(model, snap)


def test_untraceable_model_is_named_and_left_unchanged():
    model = Branchy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot trace gate"):
        pk.prune_channels(model, CALIB, ratio=0.5)
    assert same(model, snap)


def test_failure_midway_restores_every_tensor(monkeypatch):
    model = resnet_mnist(width=4).eval()
    snap, shapes = snapshot(model), [m.weight.shape for m in model.modules() if hasattr(m, "weight")]
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = refit_mod.refit_columns
    monkeypatch.setattr(refit_mod, "refit_columns", boom)
    with pytest.raises(KeyboardInterrupt):
        pk.prune_channels(model, CALIB, ratio=0.5)
    assert same(model, snap) and [m.weight.shape for m in model.modules() if hasattr(m, "weight")] == shapes


def test_a_model_in_training_mode_keeps_its_batchnorm_statistics_on_bad_input():
    """Tracing runs a forward: in training mode that would move BatchNorm's running statistics."""
    model = resnet_mnist(width=4).train()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="leaves none"):
        pk.prune_channels(model, CALIB, ratio=0.99)
    assert same(model, snap) and model.training


@pytest.mark.parametrize("score,refine", [("wanda", None), ("obs", None), ("l2", "snows")])
def test_string_padding_is_refused_where_im2col_columns_are_read(score, refine):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding="same"), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 3, padding="same"))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^2: refine='lstsq'/'snows' and score='wanda'/'obs' read im2col"):
        pk.prune_channels(model, CALIB, ratio=0.5, score=score, refine=refine)
    assert same(model, snap)


def test_multiple_of_gives_multiples_in_the_pruned_modules():
    model = resnet_mnist(width=8).eval()
    result = pk.prune_channels(model, CALIB, flops=0.5, refine=None, recalibrate_bn=False, multiple_of=4)
    assert result.flops_removed >= 0.5
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 4 == 0 for c in convs)
    assert any(r.units_after < r.units_before for r in result.reports)


def test_multiple_of_holds_under_a_global_budget():
    model = resnet_mnist(width=8).eval()
    result = pk.prune_channels(model, CALIB, flops=0.4, refine=None, recalibrate_bn=False, budget="global",
                               multiple_of=4)
    assert result.flops_removed >= 0.4
    assert all(r.units_after % 4 == 0 or r.units_after == r.units_before for r in result.reports)
