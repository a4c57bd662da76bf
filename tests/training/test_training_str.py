import copy

import pytest
import torch
from torch import nn

from prunekit.training import STR
from helpers.training_toys import TARGETS, data, make, train_step

def test_forward_and_true_relu_gradient():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = STR(model, opt, s_init=-2.0, targets=TARGETS)
    assert len(opt.param_groups) == 2 and len(opt.param_groups[1]["params"]) == 2
    d = torch.sigmoid(torch.tensor(-2.0))
    x, y = data()
    theta = model[0].weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    pruned = theta.abs() <= d
    assert pruned.any() and (~pruned).any()
    assert not model[0].weight.grad[pruned].any()  # pruned entries get no loss gradient
    assert model[0].weight.grad[~pruned].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs() > 0 for p in pruner.s.values())
    assert abs(pruner.thresholds()["0"] - float(d)) < 1e-7


def test_weight_decay_on_thresholds_raises_sparsity():
    sparsity = {}
    for wd in (0.0, 0.5):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        pruner = STR(model, opt, s_init=-3.0, s_weight_decay=wd, targets=TARGETS)
        x, y = data()
        for _ in range(60):
            train_step(model, opt, pruner, x, y)
        sparsity[wd] = pruner.sparsity()
    assert sparsity[0.5] > sparsity[0.0]


def test_resume_is_bit_for_bit_and_finalize_detaches():
    def build(seed=0):
        model = make(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return model, opt, STR(model, opt, s_init=-3.0, s_weight_decay=0.3, final_sparsity=0.7, targets=TARGETS)

    def run(resume_at=None):
        model, opt, pruner = build()
        x, y = data()
        for t in range(30):
            if t == resume_at:
                ckpt = copy.deepcopy([o.state_dict() for o in (model, opt, pruner)])
                objs = build(seed=4)
                for o, s in zip(objs, ckpt):
                    o.load_state_dict(s)
                model, opt, pruner = objs
            train_step(model, opt, pruner, x, y)
        return model, opt, pruner

    (ma, oa, pa), (mb, _, pb) = run(), run(resume_at=13)
    assert all(torch.equal(v, mb.state_dict()[k]) for k, v in ma.state_dict().items())
    assert pa.thresholds() == pb.thresholds()
    keys = list(ma.state_dict())
    masks = pa.finalize()
    assert list(ma.state_dict()) == keys and len(oa.param_groups) == 1
    assert not ma[0]._forward_pre_hooks and "weight" not in ma[0].__dict__
    assert all(torch.equal(ma.get_submodule(n).weight != 0, masks[n]) for n in TARGETS)
    assert masks.sparsity() >= 0.7 - 1e-9
    with pytest.raises(RuntimeError, match="after finalize"):
        pa.step()


def test_bad_input():
    model = make()
    with pytest.raises(ValueError, match="not owned by the optimizer"):
        STR(model, torch.optim.SGD(model[0].parameters(), lr=0.1), targets=TARGETS)
    other = nn.Sequential(nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 8))
    theirs = STR(other, torch.optim.SGD(other.parameters(), lr=0.1), targets=TARGETS).state_dict()
    pruner = STR(model, torch.optim.SGD(model.parameters(), lr=0.1), targets=TARGETS)
    before = pruner.thresholds()
    with pytest.raises(ValueError, match="different model"):
        pruner.load_state_dict(theirs)
    assert pruner.thresholds() == before
