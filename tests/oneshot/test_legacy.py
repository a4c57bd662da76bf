"""The deprecated per-method keywords of prune() still work, warn, and match the new spelling."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


DATA = [torch.randn(32, 8, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


@pytest.mark.parametrize("old,new", [
    ({"method": "sparsegpt", "sparsegpt_block_size": 4, "damp": 0.1},
     {"method": "sparsegpt", "method_options": {"block_size": 4, "damp": 0.1}}),
    ({"refine": "lstsq", "lstsq_damp": 0.5}, {"refine": "lstsq", "refine_options": {"damp": 0.5}}),
    ({"refine": "snows", "snows": {"k": 1, "max_cg": 3}, "lstsq_damp": 0.5},
     {"refine": "snows", "refine_options": {"k": 1, "max_cg": 3, "warm_start_damp": 0.5}}),
    ({"refine": "snows", "snows": pk.SnowsConfig(k=1, solver=pk.NewtonCGConfig(epochs=1, max_cg=3))},
     {"refine": "snows", "refine_options": {"k": 1, "max_cg": 3, "hessian_fraction": 1.0}}),  # the solver default
])
def test_old_keywords_warn_and_give_the_same_weights(old, new):
    a, b = _mlp(), _mlp()
    with pytest.warns(DeprecationWarning, match="is deprecated; pass (method|refine)_options"):
        pk.prune(a, DATA, sparsity=0.5, progress=False, **old)
    pk.prune(b, DATA, sparsity=0.5, progress=False, **new)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_the_options_change_the_result():
    """The mapping reaches the method: another block size gives other weights."""
    a, b = _mlp(), _mlp()
    pk.prune(a, DATA, sparsity=0.5, method="sparsegpt", method_options={"block_size": 4}, progress=False)
    pk.prune(b, DATA, sparsity=0.5, method="sparsegpt", progress=False)
    assert not torch.equal(a[2].weight, b[2].weight)


def test_old_snows_keyword_is_still_validated():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown snows option 'kk'"):
        pk.prune(model, DATA, sparsity=0.5, refine="snows", snows={"kk": 1}, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
