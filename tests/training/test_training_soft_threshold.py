import copy
import math

import pytest
import torch
from torch import nn

from prunekit.training import SoftThreshold
from helpers.training_toys import TARGETS, data, make

def train_step(model, opt, pruner, x, y, sched=None):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    pruner.step()
    if sched is not None:
        sched.step()
    return loss


def warmup_cosine(total, warm=10):
    return lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))


def test_forward_is_soft_threshold_and_backward_is_straight_through():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = SoftThreshold(model, opt, total_steps=10, schedule="constant", final_threshold=0.1, targets=TARGETS)
    x, y = data()
    theta = [model[i].weight.detach().clone() for i in (0, 2)]
    w = [(t.sign() * (t.abs() - 0.1).clamp_min(0)).requires_grad_() for t in theta]
    ref = nn.functional.linear(torch.relu(nn.functional.linear(x, w[0], model[0].bias)), w[1], model[2].bias)
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-6)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(ref, y).backward()
    for i, wi in zip((0, 2), w):
        assert torch.allclose(model[i].weight.grad, wi.grad, atol=1e-6)  # dense gradient at w, pruned entries too
        assert model[i].weight.grad[wi.detach() == 0].abs().sum() > 0
    assert isinstance(model[0].weight, nn.Parameter)  # outside the forward the latent is the parameter
    assert abs(pruner.sparsity() - float(sum((t.abs() <= 0.1).sum() for t in theta)) / 768) < 1e-9


@pytest.mark.parametrize("kind,kw", [("s_lats", {}), ("lats", {"steps_per_epoch": 10}), ("pgh", {"beta": 0.01}),
                                     ("linear", {}), ("sine", {}), ("exact_lats", {})])
def test_threshold_is_dense_at_step_zero_and_ends_exactly_at_D(kind, kw):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr_fn = warmup_cosine(60)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    if kind == "exact_lats":
        kw = {"lr_fn": lambda k: 0.1 * lr_fn(k)}
    pruner = SoftThreshold(model, opt, total_steps=60, schedule=kind, final_threshold=0.05, targets=TARGETS, **kw)
    x, y = data()
    ds, lams = [pruner.threshold], []
    for _ in range(70):
        train_step(model, opt, pruner, x, y, lr_sched)
        ds.append(pruner.threshold)
        lams.append(pruner.last_lambda)
    assert ds[0] == 0.0 and ds[60] == 0.05 and ds[-1] == 0.05
    assert all(b >= a for a, b in zip(ds, ds[1:]))
    if kind == "exact_lats":  # lambda = D / sum(lr): flat through warm-up and decay
        assert max(lams[:59]) / min(lams[:59]) < 1 + 1e-6
        assert abs(lams[0] - 0.05 / sum(0.1 * lr_fn(k) for k in range(60))) < 1e-9


def lasso_cd(X, y, alpha, iters=5000):
    """Oracle: coordinate descent for 1/(2n)|Xw - y|^2 + alpha |w|_1 in float64."""
    n, p = X.shape
    w = torch.zeros(p, dtype=torch.float64)
    col = (X ** 2).sum(0) / n
    for _ in range(iters):
        for j in range(p):
            r = y - X @ w + X[:, j] * w[j]
            rho = float(X[:, j] @ r) / n
            w[j] = math.copysign(max(abs(rho) - alpha, 0.0), rho) / col[j]
    return w


def test_exact_lats_converges_to_the_lasso_at_coefficient_one_minus_mu_lambda():
    g = torch.Generator().manual_seed(0)
    n, p = 60, 10
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    true = torch.tensor([2.0, -1.5, 0, 0, 1.0, 0, 0, 0.3, 0, 0], dtype=torch.float64)
    y = X @ true + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    lam, mu = 0.6, 0.5
    model = nn.Sequential(nn.Linear(p, 1, bias=False)).double()
    nn.init.zeros_(model[0].weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=mu)
    pruner = SoftThreshold(model, opt, total_steps=4000, schedule="exact_lats", lam=lam, targets=["0"])
    for _ in range(4000):
        loss = 0.5 * ((model(X).squeeze(1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    pruner.finalize()
    oracle = lasso_cd(X, y, (1 - mu) * lam)
    got = model[0].weight.detach().squeeze(0)
    assert torch.equal(got != 0, oracle != 0) and 0 < int((oracle == 0).sum()) < p
    assert torch.allclose(got, oracle, atol=1e-6)


@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_target_sparsity_extension_and_exact_projection(budget):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pruner = SoftThreshold(model, opt, total_steps=150, target_sparsity=0.9, budget=budget, project=True, targets=TARGETS)
    x, y = data()
    for _ in range(150):
        train_step(model, opt, pruner, x, y)
    assert abs(pruner.sparsity() - 0.9) < 0.005
    if budget == "uniform":
        assert all(abs(1 - float(m.float().mean()) - 0.9) < 0.01 for _, m in pruner.masks().items())
    masks = pruner.finalize()
    assert sum(int((~m).sum()) for _, m in masks.items()) == round(0.9 * 768)


def test_latent_weights_regrow_and_greedy_variant_stores_zeros():
    regrown = {}
    for greedy in (False, True):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        pruner = SoftThreshold(model, opt, total_steps=200, final_threshold=0.15, greedy=greedy, targets=TARGETS)
        x, y = data()
        prev, count = pruner.masks(), 0
        for _ in range(200):
            train_step(model, opt, pruner, x, y)
            cur = pruner.masks()
            count += sum(int((~prev[n] & cur[n]).sum()) for n in TARGETS)
            prev = cur
        regrown[greedy] = count
        if greedy:
            assert all(torch.equal(model.get_submodule(n).weight != 0, cur[n]) for n in TARGETS)
    assert regrown[False] > 0


def test_resume_from_checkpoint_is_bit_for_bit():
    lr_fn = warmup_cosine(40)

    def build(seed=0):
        model = make(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
        pruner = SoftThreshold(model, opt, total_steps=40, schedule="exact_lats", target_sparsity=0.8,
                               lr_fn=lambda k: 0.1 * lr_fn(k), control_every=3, targets=TARGETS)
        return model, opt, sched, pruner

    def run(resume_at=None):
        model, opt, sched, pruner = build()
        x, y = data()
        for t in range(40):
            if t == resume_at:
                ckpt = copy.deepcopy([o.state_dict() for o in (model, opt, sched, pruner)])
                objs = build(seed=3)
                for o, s in zip(objs, ckpt):
                    o.load_state_dict(s)
                model, opt, sched, pruner = objs
            train_step(model, opt, pruner, x, y, sched)
        return model.state_dict(), pruner.state_dict()

    (a, pa), (b, pb) = run(), run(resume_at=17)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pa == pb


def test_finalize_writes_S_D_and_leaves_a_plain_model():
    model = make()
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = SoftThreshold(model, opt, total_steps=30, final_threshold=0.05, targets=TARGETS, auto_step=True)
    x, y = data()
    for _ in range(30):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert pruner.step_count == 30 and pruner.threshold == 0.05
    with torch.no_grad():
        expected_out = model(x)
    theta = model[0].weight.detach().clone()
    masks = pruner.finalize()
    assert list(model.state_dict()) == keys
    assert torch.equal(model[0].weight.detach(), theta - theta.clamp(-0.05, 0.05))
    assert torch.equal(model[0].weight != 0, masks["0"])
    assert torch.equal(model(x), expected_out)
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks and "weight" not in model[0].__dict__
    with pytest.raises(RuntimeError, match="after finalize"):
        pruner.step()


def test_bad_input_raises_and_changes_nothing():
    model = make()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0.weight is not owned by the optimizer"):
        SoftThreshold(model, opt, total_steps=10, final_threshold=0.1, targets=TARGETS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\)"):
        SoftThreshold(model, opt, total_steps=10, target_sparsity=1.0, targets=TARGETS)
    with pytest.raises(ValueError, match=r"total_steps \(10\) must be greater than its start \(20\)"):
        SoftThreshold(model, opt, total_steps=10, start_step=20, final_threshold=0.1, targets=TARGETS)
    with pytest.raises(ValueError, match="beta"):
        SoftThreshold(model, opt, total_steps=10, schedule="pgh", final_threshold=0.1, targets=TARGETS)
    with pytest.raises(ValueError, match="exactly one"):
        SoftThreshold(model, opt, total_steps=10, final_threshold=0.1, target_sparsity=0.5, targets=TARGETS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_pre_hooks and not opt._optimizer_step_post_hooks

    other = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    theirs = SoftThreshold(other, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=10,
                           final_threshold=0.1, targets=TARGETS).state_dict()
    pruner = SoftThreshold(model, opt, total_steps=10, final_threshold=0.1, targets=TARGETS)
    mine = copy.deepcopy(pruner.state_dict())
    with pytest.raises(ValueError, match="different model"):
        pruner.load_state_dict(theirs)
    assert pruner.state_dict() == mine


def test_constant_threshold_variants_and_per_layer_thresholds():
    x, _ = data()
    model = make()
    with torch.no_grad():
        dense_out = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    SoftThreshold(model, opt, total_steps=10, schedule="constant", final_threshold=0.1, shift_init=True, targets=TARGETS)
    with torch.no_grad():
        assert torch.allclose(model(x), dense_out, atol=1e-5)  # (a) the shifted init is the dense network
    model = make()
    w0 = model[0].weight.detach().clone()
    pruner = SoftThreshold(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, schedule="constant",
                           final_threshold={"0": 0.1, "2": 0.02}, targets=TARGETS)
    assert torch.equal(pruner.masks()["0"], w0.abs() > 0.1)  # (b) literal pruning at init, per-layer d
    assert pruner.threshold == {"0": 0.1, "2": 0.02}
