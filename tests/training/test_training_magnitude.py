import copy

import pytest
import torch
from torch import nn

from prunekit import allocate, check_nm
from prunekit.sparsity.patterns import NM
from prunekit.training.schedules import Cubic, Cyclical, OneShot
from prunekit.training import MagnitudePruner
from helpers.training_toys import TARGETS, data, make, train_step

def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("budget", ["uniform", "global", "erk"])
def test_one_shot_counts_are_exact_for_every_budget(budget):
    model = make()
    expected = allocate({n: model.get_submodule(n).weight.abs() for n in TARGETS}, 0.75, budget)
    pruner = MagnitudePruner(model, sgd(model), OneShot(0.75), budget=budget, targets=TARGETS)
    for n in TARGETS:
        w = model.get_submodule(n).weight
        assert int((w == 0).sum()) == round(expected[n] * w.numel()) == int((~pruner.masks()[n]).sum())
    assert abs(pruner.sparsity() - 0.75) < 1e-3


def test_global_budget_keeps_the_largest_magnitudes():
    model = make()
    before = torch.cat([model.get_submodule(n).weight.detach().abs().flatten() for n in TARGETS])
    MagnitudePruner(model, sgd(model), 0.6, budget="global", targets=TARGETS)
    after = torch.cat([model.get_submodule(n).weight.detach().flatten() for n in TARGETS])
    k = round(0.6 * before.numel())
    assert int((after == 0).sum()) == k
    assert before[after == 0].max() <= before[after != 0].min()


def test_gradual_nm_is_valid_at_every_step_and_ends_at_n_of_m():
    model = make()
    opt = sgd(model)
    pruner = MagnitudePruner(model, opt, Cubic(0.5, total_steps=40, end=30, every=2), pattern="2:4", targets=TARGETS)
    x, y = data()
    seen = set()
    for _ in range(40):
        train_step(model, opt, pruner, x, y)
        s = pruner.s_prev
        kept = 4 - round(s * 4)
        seen.add(kept)
        for n in TARGETS:
            assert kept == 4 or check_nm(model.get_submodule(n).weight != 0, NM(max(kept, 2), 4))
    assert seen >= {2, 3}
    for n in TARGETS:
        w = model.get_submodule(n).weight
        assert int((w != 0).sum()) == w.numel() // 2
    with pytest.raises(ValueError, match="N:M pattern 2:4 means sparsity 0.5"):
        MagnitudePruner(model, opt, Cubic(0.9, 40, every=2), pattern="2:4", targets=TARGETS)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_pruned_weights_and_optimizer_state_stay_zero_for_1000_steps(optim):
    model = make()
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner = MagnitudePruner(model, opt, Cyclical(0.9, total_steps=1000, cycles=2, every=10), targets=TARGETS)
    x, y = data()
    for t in range(1000):
        train_step(model, opt, pruner, x, y)
        for n in TARGETS:
            w, m = model.get_submodule(n).weight, pruner.masks()[n]
            assert not w[~m].any(), f"step {t}: pruned weight of {n} moved"
            for key, buf in opt.state[w].items():
                if torch.is_tensor(buf) and buf.shape == w.shape:
                    assert not buf[~m].any(), f"step {t}: optimizer state {key} of {n} not zero"
    assert abs(pruner.sparsity() - 0.9) < 1e-3


def test_cyclical_masks_never_gain_inside_a_cycle_and_recover_at_resets():
    model = make()
    opt = sgd(model)
    sched = Cyclical(0.95, total_steps=300, cycles=3, start=0, end=240, every=4)
    pruner = MagnitudePruner(model, opt, sched, budget="global", targets=TARGETS)
    x, y = data()
    prev, prev_s = pruner.masks().state_dict(), pruner.s_prev
    for _ in range(300):
        train_step(model, opt, pruner, x, y)
        cur = pruner.masks().state_dict()
        if pruner.s_prev >= prev_s:  # inside a cycle
            assert all(not (cur[n] & ~prev[n]).any() for n in TARGETS)
        prev, prev_s = cur, pruner.s_prev
    pruner.finalize()
    assert [c["step"] for c in pruner.cycle_stats] == [160, 300]
    assert all(c["recovery"] > 0 for c in pruner.cycle_stats)
    total = sum(model.get_submodule(n).weight.numel() for n in TARGETS)
    assert sum(int((model.get_submodule(n).weight == 0).sum()) for n in TARGETS) == round(0.95 * total)


def trained(schedule, steps):
    """A toy model trained ``steps`` steps under ``schedule``, and its pruner."""
    model = make()
    opt = sgd(model)
    pruner = MagnitudePruner(model, opt, schedule, targets=TARGETS)
    x, y = data()
    for _ in range(steps):
        train_step(model, opt, pruner, x, y)
    return model, pruner


def test_one_cycle_is_gmp_bit_for_bit_and_gmp_never_recovers():
    runs = []
    for sched in (Cyclical(0.9, 120, cycles=1, start=10, end=100, every=5), Cubic(0.9, 120, start=10, end=100, every=5)):
        model, pruner = trained(sched, 120)
        pruner.finalize()
        assert pruner.cycle_stats == []  # one cycle: no reset, no re-introduced weight
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_keep_mode_gives_back_the_value_at_pruning_time():
    model = make()
    opt = sgd(model)
    sched = lambda t: 0.5 if t < 5 else 0.0  # prune, then re-open at step 5
    pruner = MagnitudePruner(model, opt, sched, mode="keep", targets=TARGETS)
    w0 = model.get_submodule("0").weight
    mask = pruner.masks()["0"].clone()
    saved = pruner.latent["0"].clone()
    assert not w0[~mask].any() and saved[~mask].abs().min() > 0
    x, y = data()
    for _ in range(5):
        train_step(model, opt, pruner, x, y)
    assert pruner.masks()["0"].all()
    assert torch.equal(w0.detach()[~mask], saved[~mask])
    assert not opt.state[w0]["momentum_buffer"][~mask].any()  # restarted with zero state


def test_resume_from_checkpoint_is_bit_for_bit():
    def run(steps, resume_at=None):
        model = make()
        opt = sgd(model)
        sched = Cyclical(0.9, 60, cycles=2, start=0, end=50, every=3)
        pruner = MagnitudePruner(model, opt, sched, targets=TARGETS, mode="keep")
        x, y = data()
        for t in range(steps):
            if t == resume_at:
                ckpt = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
                model = make(seed=5)
                opt = sgd(model)
                pruner = MagnitudePruner(model, opt, sched, targets=TARGETS, mode="keep")
                model.load_state_dict(ckpt[0])
                opt.load_state_dict(ckpt[1])
                pruner.load_state_dict(ckpt[2])
            train_step(model, opt, pruner, x, y)
        return model.state_dict(), pruner.state_dict()

    (a, pa), (b, pb) = run(60), run(60, resume_at=31)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(pa["masks"][n], pb["masks"][n]) for n in TARGETS) and pa["step"] == pb["step"] == 60


def test_finalize_leaves_a_plain_model_and_auto_step_hook():
    model = make()
    keys = list(model.state_dict())
    opt = sgd(model)
    pruner = MagnitudePruner(model, opt, Cubic(0.8, 20, every=2), targets=TARGETS, auto_step=True)
    x, y = data()
    for _ in range(20):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert pruner.step_count == 20
    masks = pruner.finalize()
    assert list(model.state_dict()) == keys
    for n in TARGETS:
        assert torch.equal(model.get_submodule(n).weight != 0, masks[n])
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(RuntimeError, match="after finalize"):
        pruner.step()


def test_bad_input_raises_and_changes_nothing():
    model = make()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2.weight is not owned by the optimizer"):
        MagnitudePruner(model, opt, 0.5, targets=TARGETS)
    for bad in (1.0, -0.2):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            MagnitudePruner(model, sgd(model), bad, targets=TARGETS)
    with pytest.raises(ValueError, match=r"schedule\(0\) must be in \[0, 1\)"):
        MagnitudePruner(model, sgd(model), lambda t: 1.5, targets=TARGETS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    other = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    other_state = MagnitudePruner(other, sgd(other), 0.5, targets=TARGETS).state_dict()
    opt = sgd(model)
    pruner = MagnitudePruner(model, opt, 0.5, targets=TARGETS)
    snap = copy.deepcopy((model.state_dict(), pruner.state_dict(), opt.state_dict()))
    with pytest.raises(ValueError, match="different model"):
        pruner.load_state_dict(other_state)
    assert all(torch.equal(snap[0][k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(snap[1]["masks"][n], pruner.masks()[n]) for n in TARGETS)
    assert opt.state_dict() == snap[2]


def test_initial_masks_resume_without_reselection():
    model = make()
    with torch.no_grad():  # a non-uniform support, as a global budget or SparseGPT would leave
        model[0].weight[:, :12] = 0
        model[2].weight[:4] = 0
    before = copy.deepcopy(model.state_dict())
    masks = {n: dict(model.named_modules())[n].weight != 0 for n in TARGETS}
    opt = sgd(model)
    pruner = MagnitudePruner(model, opt, 0.5, masks=masks, targets=TARGETS)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # building the pruner changed nothing
    x, y = data()
    for _ in range(20):
        train_step(model, opt, pruner, x, y)
    for n in TARGETS:
        w = dict(model.named_modules())[n].weight
        assert not w[~masks[n]].any()
    other = make()
    with pytest.raises(ValueError, match="names differ"):
        MagnitudePruner(other, sgd(other), 0.5, masks={"zzz": torch.ones(3)}, targets=TARGETS)


@pytest.mark.parametrize("schedule", [Cubic(final=0.9, total_steps=10), Cyclical(final=0.9, total_steps=10, cycles=2)])
def test_short_runs_with_default_update_intervals_reach_the_exact_target(schedule):
    masks = trained(schedule, 10)[1].finalize()
    assert [int((~m).sum()) for _, m in masks.items()] == [round(0.9 * 512), round(0.9 * 256)]
