"""BatchNorm re-estimation: only the BN buffers change, modes and momenta come back."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.batchnorm import batchnorm_layers


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 4))


def data(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def test_only_batchnorm_buffers_change_and_modes_come_back():
    m = net().eval()
    m[3].train()  # a mixed-mode model: one dropout left in train
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    used = pk.recalibrate_batchnorm(m, data(), batches=2)
    assert used == 2
    after = m.state_dict()
    bn_keys = {f"{n}.{b}" for n in ("1", "5", "9") for b in ("running_mean", "running_var", "num_batches_tracked")}
    for k in before:
        if k in bn_keys:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert m[1].momentum == 0.3 and m[5].momentum == 0.1
    assert int(m[1].num_batches_tracked) == 2
    assert all(p.grad is None for p in m.parameters())


def test_cumulative_average_of_the_batches():
    m = nn.Sequential(nn.BatchNorm1d(3))
    xs = [torch.randn(4, 3) * 3 + 2, torch.randn(6, 3) - 1]
    pk.recalibrate_batchnorm(m, xs)
    means = torch.stack([x.mean(0) for x in xs])
    unbiased = torch.stack([x.var(0, unbiased=True) for x in xs])
    assert torch.allclose(m[0].running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(m[0].running_var, unbiased.mean(0), atol=1e-5)


def test_bad_input_and_errors_leave_the_model_as_it_was():
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="batches must be a positive integer"):
        pk.recalibrate_batchnorm(m, data(), batches=0)
    with pytest.raises(TypeError, match="iterable of input batches"):
        pk.recalibrate_batchnorm(m, torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="data is empty"):
        pk.recalibrate_batchnorm(m, [])
    with pytest.raises(RuntimeError):
        pk.recalibrate_batchnorm(m, [torch.randn(2, 5, 6, 6)])  # wrong channels: fails mid-pass
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m[1].momentum == 0.3 and m.training
    assert pk.recalibrate_batchnorm(nn.Linear(2, 2), data()) == 0  # no BatchNorm: nothing runs
    assert list(batchnorm_layers(m)) == ["1", "5", "9"]


def test_prune_recalibrate_bn():
    m = net().eval()
    stale = m[1].running_mean.clone()
    result = pk.prune(m, data(), sparsity=0.7, method="magnitude", recalibrate_bn=True)
    assert result.bn_batches == 3 and "re-estimated on 3 calibration batches" in result.summary()
    assert not torch.equal(m[1].running_mean, stale) and not m.training
    plain = pk.prune(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [torch.randn(3, 4)], sparsity=0.5,
                     recalibrate_bn=True)
    assert plain.bn_batches == 0 and "no BatchNorm layer" in plain.summary()
    with pytest.raises(ValueError, match="recalibrate_bn=True .* pass calibration batches"):
        pk.prune(net(), None, sparsity=0.5, recalibrate_bn=True)
    with pytest.raises(TypeError, match="recalibrate_bn must be True or False"):
        pk.prune(net(), data(), sparsity=0.5, recalibrate_bn=1)
