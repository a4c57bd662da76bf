"""What both group pruners share: removed units stay exactly zero through SGD momentum, Adam and
AdamW; resuming from state_dict repeats the trajectory; finalize() gives a smaller plain model
computing what the masked one did."""
import pytest
import torch

import prunekit as pk
from helpers.group_toys import cnn, data, mlp, train

OPTIMIZERS = {
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def make(kind, pruner, opt_name="momentum", seed=0):
    model = cnn(seed) if kind == "cnn" else mlp(seed)
    x, y = data(kind)
    opt = OPTIMIZERS[opt_name](model.parameters())
    where = {"example": x[:2]} if kind == "cnn" else {"groups": "mlp"}
    if pruner == "soft":
        p = pk.GroupSoftThreshold(model, opt, total_steps=12, target=0.4, control_every=2, **where)
    else:
        p = pk.GroupMagnitudePruner(model, opt, pk.Cubic(0.4, total_steps=12, every=2), **where)
    return model, opt, p, x, y


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("pruner", ["soft", "gmp"])
def test_removed_units_stay_zero_through_the_optimizer(pruner, opt_name):
    model, opt, p, x, y = make("cnn", pruner, opt_name)
    train(model, opt, p, x, y, 8)
    assert p.removed.any()
    gone = p.removed.clone()
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        keep = p.groups.keep(gone)
        for name, k in keep.items():  # before the pruner's step: the optimizer alone kept them at zero
            param = p.groups.params[name]
            assert param.detach()[~k].abs().sum() == 0, name
            for value in opt.state[param].values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert value[~k].abs().sum() == 0, name
        p.step()
        assert bool((p.removed | ~gone).all())


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("pruner", ["soft", "gmp"])
def test_resume_from_state_dict_repeats_the_trajectory(kind, pruner):
    model, opt, p, x, y = make(kind, pruner)
    train(model, opt, p, x, y, 5)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, _clone(opt.state_dict()), _clone(p.state_dict()))
    train(model, opt, p, x, y, 6)
    model2, opt2, p2, _, _ = make(kind, pruner, seed=3)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    p2.load_state_dict(saved[2])
    train(model2, opt2, p2, x, y, 6)
    assert torch.equal(p.removed, p2.removed)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def _clone(state):
    if torch.is_tensor(state):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("pruner", ["soft", "gmp"])
def test_finalize_gives_a_smaller_model_computing_the_masked_output(kind, pruner):
    model, opt, p, x, y = make(kind, pruner)
    train(model, opt, p, x, y, 12)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    params = sum(q.numel() for q in model.parameters())
    result = p.finalize()
    assert result.params_before == params and result.params_after < params
    assert sum(q.numel() for q in model.parameters()) == result.params_after
    assert sum(len(v) for v in result.removed.values()) == int(p.removed.sum())
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-5)
    assert all(m.all() for _, m in p.masks().items()) and p.sparsity() == 0.0
    assert all(m.shape == p.targets[n].weight.shape for n, m in p.masks().items())
    assert result.summary().count("->") >= len(result.units_before)
    with pytest.raises(RuntimeError, match="after finalize"):
        p.step()


def test_a_state_dict_of_another_pruner_or_model_is_refused_and_changes_nothing():
    model, opt, p, x, y = make("cnn", "soft")
    train(model, opt, p, x, y, 6)
    before = p.state_dict()
    _, _, gmp, _, _ = make("cnn", "gmp")
    with pytest.raises(ValueError, match="'GroupMagnitudePruner' pruner"):
        p.load_state_dict(gmp.state_dict())
    _, _, other, _, _ = make("mlp", "soft")
    with pytest.raises(ValueError, match="different model"):
        p.load_state_dict(other.state_dict())
    after = p.state_dict()
    assert torch.equal(before["removed"], after["removed"]) and before["d"] == after["d"]
