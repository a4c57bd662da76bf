"""Exact sparsity with dead inputs (zero on all calibration data): counts kept with equality."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.dead import dead_columns, fill_dead, keep_dead_dense
from prunekit.oneshot.solvers.sparsegpt import sparsegpt
from prunekit.oneshot.stats import LayerStats
from prunekit.sparsity.patterns import Unstructured

COMBOS = [("sparsegpt", None), ("sparsegpt", "lstsq"), ("magnitude", "lstsq"), ("wanda", "lstsq"),
          ("wanda", None), ("magnitude", "snows")]


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _run(model, data, method, refine, exact, sparsity=0.5):
    opts = {"k": 2, "max_cg": 5} if refine == "snows" else None
    return pk.prune(model, data, sparsity=sparsity, method=method, refine=refine, refine_options=opts, exact=exact)


def _nonzeros(model):
    return {n: int(torch.count_nonzero(m.weight)) for n, m in model.named_modules() if n in ("0", "2")}


@pytest.mark.parametrize("method,refine", COMBOS)
def test_conv_calibrated_on_tiny_images_keeps_exact_counts(method, refine):
    """At 1x1 inputs a padded 3x3 conv only sees its centre tap: 8 of its 9 kernel positions are dead."""
    data = [torch.randn(4, 3, 1, 1) for _ in range(2)]
    model = cnn()
    dense = {n: model[int(n)].weight.detach().clone() for n in ("0", "2")}
    result = _run(model, data, method, refine, exact=True)
    assert _nonzeros(model) == {"0": 216 - 108, "2": 576 - 288}
    assert {r.name: r.dead_columns for r in result.layers} == {"0": 24, "2": 64}
    assert all(r.extra_zeros == 0 for r in result.layers)
    for n in ("0", "2"):  # a kept weight of a dead kernel position is its dense value
        w, w0 = model[int(n)].weight.detach(), dense[n]
        border = torch.ones(3, 3, dtype=torch.bool)
        border[1, 1] = False
        kept = (w != 0) & border
        assert kept.any() and torch.equal(w[kept], w0[kept])
    assert "24 dead input columns" in result.summary()


def test_exact_false_is_the_reference_and_says_so():
    data = [torch.randn(4, 3, 1, 1) for _ in range(2)]
    model = cnn()
    result = _run(model, data, "magnitude", "lstsq", exact=False)
    extra = {r.name: r.extra_zeros for r in result.layers}
    nnz = _nonzeros(model)
    assert extra["0"] > 0 and nnz["0"] == 216 - 108 - extra["0"] and nnz["2"] == 576 - 288 - extra["2"]
    assert f"{extra['0'] + extra['2']} weights kept by the support are zero" in result.summary()
    model = cnn()
    _run(model, data, "sparsegpt", None, exact=False)
    assert _nonzeros(model)["0"] == 216 - 192  # 8/9 of the layer dead: only the centre taps survive


@pytest.mark.parametrize("method,refine", COMBOS)
def test_linear_with_a_dead_input(method, refine):
    data = []
    for _ in range(2):
        x = torch.randn(8, 6)
        x[:, 2] = 0.0
        data.append(x)
    model = mlp()
    result = _run(model, data, method, refine, exact=True, sparsity=0.7)
    assert int(torch.count_nonzero(model[0].weight)) == 96 - round(0.7 * 96)
    assert result.layers[0].dead_columns == 1 and result.layers[0].extra_zeros == 0


@pytest.mark.parametrize("method,refine", COMBOS)
def test_bit_identical_when_no_column_is_dead(method, refine):
    data = [torch.randn(8, 6) for _ in range(2)]
    a, b = mlp(), mlp()
    ra = _run(a, data, method, refine, exact=True)
    _run(b, data, method, refine, exact=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert [r.dead_columns for r in ra.layers] == [0, 0]


def test_sparsegpt_keep_dead_inputs():
    torch.manual_seed(0)
    x = torch.randn(64, 12, dtype=torch.float64)
    x[:, [3, 7]] = 0.0
    w = torch.randn(5, 12, dtype=torch.float64)
    h = x.T @ x / 64
    kept = sparsegpt(w, h, 0.5, Unstructured(), dead_inputs="keep", block_size=4)
    assert int(kept.mask.sum()) == 30 and int(torch.count_nonzero(kept.weight)) == 30
    on = kept.mask[:, [3, 7]]
    assert on.any() and torch.equal(kept.weight[:, [3, 7]][on], w[:, [3, 7]][on])
    zeroed = sparsegpt(w, h, 0.5, Unstructured(), block_size=4)
    assert int(torch.count_nonzero(zeroed.weight[:, [3, 7]])) == 0
    live = torch.ones(64, 12, dtype=torch.float64)  # without dead columns the two modes agree bit for bit
    h2 = (x + live).T @ (x + live) / 64
    assert torch.equal(sparsegpt(w, h2, 0.5, Unstructured(), dead_inputs="keep").weight,
                       sparsegpt(w, h2, 0.5, Unstructured()).weight)
    with pytest.raises(ValueError, match="dead_inputs"):
        sparsegpt(w, h, 0.5, Unstructured(), dead_inputs="drop")


def test_helpers():
    stats = LayerStats(count=2, sq_sum=torch.tensor([0.0, 4.0, 2.0]))
    dead = dead_columns(stats)
    assert dead.tolist() == [True, False, False] and dead_columns(None) is None
    assert fill_dead(stats.sq, dead).tolist() == [3.0, 4.0, 2.0]
    w, w0 = torch.zeros(2, 3), torch.ones(2, 3)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert keep_dead_dense(w, w0, mask, dead).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_exact_must_be_a_bool():
    with pytest.raises(TypeError, match="exact must be True or False"):
        pk.prune(mlp(), None, sparsity=0.5, exact="yes")


@pytest.mark.parametrize("method,refine", [("sparsegpt", None), ("wanda", "lstsq"), ("sparsegpt", "snows")])
def test_nm_with_dead_inputs_keeps_n_of_every_m(method, refine):
    data = [torch.randn(4, 3, 1, 1) for _ in range(2)]
    model = cnn()
    opts = {"k": 2, "max_cg": 5} if refine == "snows" else None
    with pytest.warns(UserWarning, match="input dimension 27 is not a multiple of 4"):
        result = pk.prune(model, data, pattern="2:4", method=method, refine=refine, refine_options=opts)
    w = pk.to_matrix(model[2].weight.detach())
    assert int(torch.count_nonzero(model[2].weight)) == 288
    assert pk.check_nm(w != 0, pk.NM(2, 4))
    assert result.layers[0].dead_columns == 64 and result.layers[0].extra_zeros == 0
