"""GroupSoftThreshold: the proximal step against the closed form, thresholds against
SoftThreshold's, targets, bad input."""
import math

import pytest
import torch

import prunekit as pk
from helpers.group_toys import cnn, data, mlp, same, snapshot, train
from helpers.training_toys import make


def owned_vectors(pruner):
    """Each unit's owned entries as one vector (through the slices' indices, entry by entry)."""
    g = pruner.groups
    parts = [[] for _ in range(g.units)]
    for sl in g.slices:
        if sl.own:
            w = g.params[sl.param].detach().double()
            for row, u in zip(sl.index.tolist(), sl.units.tolist()):
                for i in row:
                    parts[u].append(w.select(sl.axis, i).reshape(-1))
    return [torch.cat(p) for p in parts]


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_prox_equals_the_closed_form_zero_groups_included(kind):
    model = cnn() if kind == "cnn" else mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = pk.GroupSoftThreshold(model, opt, total_steps=10, final_threshold=1.0,
                              groups="channels" if kind == "cnn" else "mlp",
                              example=data(kind)[0][:2] if kind == "cnn" else None)
    g = p.groups
    g.scale_(torch.where(torch.arange(g.units) == 2, 0.0, 1.0).double())  # unit 2 starts at zero
    before = owned_vectors(p)
    scores = torch.stack([v.norm() / math.sqrt(len(v)) for v in before])
    tops = [float(scores[s.start:s.start + s.count].max()) for s in g.sites]
    tau = min(float(scores[scores > 0].median()), 0.9 * min(tops))  # many reach zero, no layer empties
    dead = p.prox_(tau)
    after = owned_vectors(p)
    for u, (v, w) in enumerate(zip(before, after)):
        n = float(v.norm())
        factor = max(0.0, 1 - tau * math.sqrt(len(v)) / n) if n > 0 else 0.0
        torch.testing.assert_close(w, v * factor, rtol=1e-5, atol=1e-7)
        assert bool(dead[u]) == (factor == 0.0)
    assert bool(dead[2]) and after[2].abs().sum() == 0 and int(dead.sum()) >= 2


def test_a_layer_whose_units_would_all_go_keeps_its_largest():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = pk.GroupSoftThreshold(model, opt, total_steps=10, final_threshold=1.0, groups="mlp")
    before = owned_vectors(p)
    dead = p.prox_(1e3)
    after = owned_vectors(p)
    for site in p.groups.sites:
        span = range(site.start, site.start + site.count)
        top = max(span, key=lambda u: (float(before[u].norm()), -u))
        assert [bool(dead[u]) for u in span] == [u != top for u in span]
        assert torch.equal(after[top], before[top])


@pytest.mark.parametrize("schedule,extra", [("s_lats", {}), ("lats", {"steps_per_epoch": 4}),
                                            ("pgh", {"beta": 0.5}), ("sine", {})])
def test_thresholds_follow_soft_thresholds_schedule(schedule, extra):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ours = pk.GroupSoftThreshold(model, opt, total_steps=12, start_step=4, schedule=schedule, final_threshold=0.3,
                                 groups="mlp", **extra)
    toy = make()
    theirs = pk.SoftThreshold(toy, torch.optim.SGD(toy.parameters(), lr=0.0), total_steps=12, start_step=4,
                              schedule=schedule, final_threshold=0.3, **extra)
    seen = []
    for _ in range(14):
        ours.step()
        theirs.step()
        seen.append((ours.threshold, theirs.threshold))
    assert all(a == b for a, b in seen) and seen[-1][0] == 0.3


@pytest.mark.parametrize("kind,key,value", [("cnn", "target", 0.5), ("cnn", "flops", 0.5), ("mlp", "target", 0.4)])
def test_a_target_is_met_and_finalize_removes_it(kind, key, value):
    model = cnn() if kind == "cnn" else mlp()
    x, y = data(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    extra = {"example": x[:2]} if kind == "cnn" else {"groups": "mlp"}
    p = pk.GroupSoftThreshold(model, opt, total_steps=20, control_every=2, **{key: value}, **extra)
    train(model, opt, p, x, y, 20)
    units = p.groups.units
    p.finalize()
    got = p.flops_removed() if key == "flops" else p.group_sparsity()
    assert got >= value
    if key == "target":
        assert int(p.removed.sum()) >= round(value * units)


def test_bad_input_raises_and_changes_nothing():
    model = cnn()
    x, _ = data("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = snapshot(model)
    cases = [
        (dict(total_steps=10, example=x[:2], schedule="constant", final_threshold=0.1), "schedule must be one of"),
        (dict(total_steps=10, example=x[:2], final_threshold=0.1, target=0.5), "exactly one of"),
        (dict(total_steps=10, example=x[:2], target=1.5), "target must be a number"),
        (dict(total_steps=10, example=x[:2], target=0.95), "must keep one"),
        (dict(total_steps=10, example=x[:2], flops=0.99), "cannot be reached"),
        (dict(total_steps=10, example=x[:2], final_threshold=-1.0), "final_threshold must be"),
        (dict(total_steps=10, final_threshold=0.1), "example="),
        (dict(total_steps=10, example=x[:2], final_threshold=0.1, control_every=0), "control_every"),
        (dict(total_steps=0, example=x[:2], final_threshold=0.1), "total_steps"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pk.GroupSoftThreshold(model, opt, **kwargs)
    other = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="not owned by the optimizer"):
        pk.GroupSoftThreshold(model, other, total_steps=10, example=x[:2], final_threshold=0.1)
    assert same(model, snap) and model.training
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
