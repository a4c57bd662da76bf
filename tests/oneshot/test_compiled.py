"""prune() on a ``torch.compile``d model: the wrapped module is calibrated and pruned, and the
compiled model runs the pruned weights.

The model is compiled with ``backend="aot_eager"`` (parameters become inputs of an AOTAutograd
graph, as under the default inductor backend, without inductor's C++ build, which takes tens of
seconds on a small CPU machine); one slow test uses inductor itself."""
import copy

import pytest
import torch
from torch import nn

from prunekit.oneshot.prune import prune, uncompiled

CASES = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("wanda", "lstsq"), ("magnitude", "snows")]
FAST_SNOWS = {"k": 1, "max_cg": 5, "epochs": 1}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 2, 6, 6, generator=g) for _ in range(2)]


def _check(method, refine, backend):
    model, data = _model(), _data()
    plain = copy.deepcopy(model)
    dense_out = model(data[0]).detach()
    compiled = torch.compile(model, backend=backend)
    compiled(data[0])  # compiled before pruning, as a user's model would be
    options = dict(sparsity=0.5, method=method, refine=refine, progress=False,
                   refine_options=FAST_SNOWS if refine == "snows" else None)
    result = prune(compiled, data, **options)
    expected = prune(plain, data, **options)  # the oracle: the same call on the plain module
    assert [r.name for r in result.layers] == ["0", "2", "5"]  # the wrapped module's names; head dense
    assert not {n: why for n, why in result.skipped.items() if n != "7"}
    for r, e in zip(result.layers, expected.layers):
        assert r.sparsity == e.sparsity >= 0.5
    for (name, p), q in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        out = compiled(data[0])
        assert torch.allclose(out, model(data[0]), rtol=1e-5, atol=1e-6)  # the compiled model runs the pruned weights
        assert not torch.allclose(out, dense_out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method,refine", CASES)
def test_every_method_prunes_the_compiled_module(method, refine):
    _check(method, refine, "aot_eager")


@pytest.mark.slow
def test_inductor_runs_the_pruned_weights():
    _check("sparsegpt", None, "inductor")


def test_uncompiled_finds_the_wrapped_module():
    model = _model()
    assert uncompiled(model) is model
    assert uncompiled(torch.compile(model, backend="eager")) is model
