"""GroupMagnitudePruner: GMP removes the lowest group norms on the schedule, cyclical brings
units back as they were, FLOPs targets, bad input."""
import pytest
import torch

import prunekit as pk
from helpers.group_toys import cnn, data, mlp, same, snapshot, train


def one_step(model, opt, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def mlp_scores(model):
    fc = [(model[i].fc1.weight.detach().double(), model[i].fc1.bias.detach().double()) for i in (1, 2)]
    return torch.cat([torch.cat([w, b[:, None]], 1).norm(dim=1) / 3.0 for w, b in fc])  # |g| = 9


def test_gmp_removes_the_lowest_normalised_norms_on_the_schedule():
    model = mlp()
    x, y = data("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = pk.Cubic(0.5, total_steps=20, every=2)
    p = pk.GroupMagnitudePruner(model, opt, sched, groups="mlp")
    prev, grew = p.removed.clone(), 0
    for k in range(1, 21):
        one_step(model, opt, x, y)
        scores = mlp_scores(model)  # what the pruner ranks: after the optimizer's update
        p.step()
        assert int(p.removed.sum()) == round(sched(k) * 24) and bool((p.removed | ~prev).all())
        new = p.removed & ~prev
        if new.any():  # the newly removed are the lowest live ones
            grew += 1
            live = [u for u in range(24) if not prev[u]]
            lowest = sorted(live, key=lambda u: (float(scores[u]), u))[:int(new.sum())]
            assert sorted(torch.nonzero(new).flatten().tolist()) == sorted(lowest)
        prev = p.removed.clone()
    assert grew >= 3 and p.group_sparsity() == 0.5


def test_first_update_removes_exactly_the_brute_force_lowest():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fc = [(model[i].fc1.weight.detach().double(), model[i].fc1.bias.detach().double()) for i in (1, 2)]
    scores = torch.cat([torch.cat([w, b[:, None]], 1).norm(dim=1) / 3.0 for w, b in fc])
    p = pk.GroupMagnitudePruner(model, opt, 0.25, groups="mlp")  # a constant: removed at construction
    lowest = sorted(range(24), key=lambda u: (float(scores[u]), u))[:6]
    assert sorted(torch.nonzero(p.removed).flatten().tolist()) == sorted(lowest)
    for u in lowest:
        block, i = (1, u) if u < 12 else (2, u - 12)
        assert model[block].fc1.weight[i].abs().sum() == 0 and model[block].fc2.weight[:, i].abs().sum() == 0


def test_cyclical_brings_units_back_with_the_values_they_had():
    model = cnn()
    x, y = data("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = pk.Cyclical(0.4, total_steps=24, cycles=2, start=0, end=20, every=2)
    p = pk.GroupMagnitudePruner(model, opt, sched, example=x[:2])
    held = {}  # entry values at the step they were removed
    for k in range(1, 13):
        one_step(model, opt, x, y)
        before = {n: t.detach().clone() for n, t in p.groups.params.items()}
        old = {n: k_.clone() for n, k_ in p._keep.items()}
        p.step()
        if sched(k) < sched(k - 1):  # cycle 2 begins: every unit back, as it was
            assert not p.removed.any() and not p._keep and held
            for name, (mask, values) in held.items():
                assert torch.equal(p.groups.params[name].detach()[mask], values[mask])
            break
        for name, keep in p._keep.items():
            newly = ~keep & old.get(name, torch.ones_like(keep))
            mask, values = held.get(name, (torch.zeros_like(keep), torch.zeros_like(before[name])))
            held[name] = (mask | newly, torch.where(newly, before[name], values))
    else:
        pytest.fail("the schedule never started a new cycle")


def test_a_flops_schedule_reaches_its_fraction():
    model = cnn()
    x, y = data("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    p = pk.GroupMagnitudePruner(model, opt, pk.Cubic(0.5, total_steps=10, every=2), example=x[:2], of="flops")
    train(model, opt, p, x, y, 10)
    assert p.flops_removed() >= 0.5
    result = p.finalize()
    assert result.flops_removed == pytest.approx(p.flops_removed(), abs=1e-12)


def test_bad_input_raises_and_changes_nothing():
    model = cnn()
    x, _ = data("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = snapshot(model)
    for args, kwargs, err, match in [
        (("x",), {"example": x[:2]}, TypeError, "schedule must be"),
        ((0.5,), {"example": x[:2], "of": "params"}, ValueError, "of must be"),
        ((0.5,), {"example": x[:2], "every": 0}, ValueError, "every must be"),
        ((0.95,), {"example": x[:2]}, ValueError, "must keep one"),
        ((0.99,), {"example": x[:2], "of": "flops"}, ValueError, "cannot be reached"),
        ((1.5,), {"example": x[:2]}, ValueError, "final"),
        ((0.5,), {"groups": "mlp"}, ValueError, "no MLP found"),
    ]:
        with pytest.raises(err, match=match):
            pk.GroupMagnitudePruner(model, opt, *args, **kwargs)
    assert same(model, snap) and model.training and not opt._optimizer_step_pre_hooks
