"""End-to-end checks of prunekit.prune on small CNNs and a tiny transformer encoder."""
import copy

import pytest
import torch
from torch import nn

from prunekit.oneshot.prune import prune
from prunekit.sparsity.patterns import NM, check_nm
from prunekit.zoo.models import resnet_mnist, small_cnn

ALL = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("magnitude", "lstsq"),
       ("wanda", "lstsq"), ("magnitude", "snows"), ("sparsegpt", "snows")]
FAST_SNOWS = {"k": 3, "max_cg": 10, "epochs": 1}


def _fast(refine):
    """Quick SNOWS settings for refine="snows" (other refits keep their defaults)."""
    return FAST_SNOWS if refine == "snows" else None


def _model(seed=0):
    torch.manual_seed(seed)
    m = resnet_mnist(width=8, blocks_per_stage=1)
    m.eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 28, 28, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method,refine", ALL)
def test_exact_sparsity_zeros_and_keys(method, refine):
    model = _model()
    keys = list(model.state_dict())
    result = prune(model, _data(), sparsity=0.75, method=method, refine=refine, progress=False, refine_options=_fast(refine))
    assert list(model.state_dict()) == keys
    assert len(result.layers) == 9  # the stem, 3 blocks x 2 convs, 2 shortcut convs
    for rep in result.layers:
        weight = dict(model.named_modules())[rep.name].weight
        pruned = int((weight == 0).sum())
        if method != "sparsegpt" and refine is None:
            # exact, Wanda's per-row comparison included (the stem's rows of 9 inputs prune 6 or 7)
            assert pruned == round(0.75 * weight.numel()), rep.name
        else:  # SparseGPT and the refits also zero weights of input columns dead on the data
            assert pruned >= round(0.75 * weight.numel()), rep.name
        assert rep.sparsity == pruned / weight.numel()
    if refine:
        assert all(r.error_refined is not None for r in result.layers)


@pytest.mark.parametrize("method,refine", ALL)
def test_nm_valid_after_every_method(method, refine):
    model = _model()
    result = prune(model, _data(), pattern="2:4", method=method, refine=refine, progress=False, refine_options=_fast(refine))
    assert "0.0" in result.skipped  # the stem has 9 inputs: skipped, listed
    for rep in result.layers:
        assert check_nm(dict(model.named_modules())[rep.name].weight != 0, NM(2, 4))


def test_lstsq_refit_never_worse_than_selection():
    result = prune(_model(), _data(), sparsity=0.8, method="magnitude", refine="lstsq", progress=False)
    # both errors come from float32 statistics (sums of float32 products): a float32 margin, so
    # that a layer the refit barely helps (one is only 4e-5 better) cannot fail on another BLAS
    for rep in result.layers:
        assert rep.error_refined <= rep.error_selected * (1 + 1e-5)


def test_snows_k0_equals_least_squares():
    """K = 0 is layer-wise least squares against the dense-block target (spec snows.md 9).

    A well-conditioned float64 MLP (tanh keeps every input feature alive, N >> d_in) so the
    least-squares optimum is unique; one full batch, so the Newton batch is the check batch."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    data = [torch.randn(400, 12, dtype=torch.float64)]
    ls_model, sn_model = copy.deepcopy(mlp), copy.deepcopy(mlp)
    ls = prune(ls_model, data, sparsity=0.6, method="magnitude", refine="lstsq", refine_options={"damp": 1e-12}, progress=False)
    sn = prune(sn_model, data, sparsity=0.6, method="magnitude", refine="snows", progress=False,
               refine_options={"k": 0, "warm_start": "none", "epochs": 3, "max_cg": 500, "cg_tol": 1e-12,
                      "damping": 1e-12, "patience": 0, "hessian_fraction": 1.0})
    assert [r.name for r in ls.layers] == ["0", "2", "4"]
    for a, b in zip(ls.layers, sn.layers):
        wa, wb = dict(ls_model.named_modules())[a.name].weight, dict(sn_model.named_modules())[a.name].weight
        assert (wa - wb).norm() <= 1e-3 * wa.norm(), a.name
        assert b.error_refined == pytest.approx(a.error_refined, rel=1e-6)
        assert a.error_refined < a.error_selected


def test_snows_improves_lookahead_loss_and_keeps_mask():
    """From the bare magnitude weights (no warm start, far from the optimum) every layer's
    lookahead loss falls by more than 5%: steps were accepted (a line search that reverts leaves
    it equal). The stem (9 inputs per filter, ~2 kept at 80%) has too little to refit and stays
    dense. The support is magnitude's, exactly."""
    model, ref = _model(), _model()
    result = prune(model, _data(), sparsity=0.8, method="magnitude", refine="snows", exclude=r"^0\.", progress=False,
                   refine_options={"k": 4, "max_cg": 30, "epochs": 2, "warm_start": "none"})
    prune(ref, None, sparsity=0.8, method="magnitude", exclude=r"^0\.", progress=False)
    assert len(result.layers) == 8
    for rep in result.layers:
        assert rep.lookahead_after < 0.95 * rep.lookahead_before, rep.name
        weight, weight_ref = (dict(m.named_modules())[rep.name].weight for m in (model, ref))
        assert torch.equal(weight != 0, weight_ref != 0), rep.name
        assert not torch.equal(weight, weight_ref), rep.name


def test_magnitude_needs_no_data_and_global_budget_hits_target():
    model = _model()
    result = prune(model, None, sparsity=0.9, budget="global", progress=False)
    total = sum(r.sparsity * torch.Size(r.shape).numel() for r in result.layers)
    n = sum(torch.Size(r.shape).numel() for r in result.layers)
    assert round(total) == round(0.9 * n)


def test_sequential_cnn_and_rerun_capture_agree():
    torch.manual_seed(0)
    a = small_cnn(width=8).eval()
    b = copy.deepcopy(a)
    data = _data()
    prune(a, data, sparsity=0.5, method="sparsegpt", progress=False)
    prune(b, data, sparsity=0.5, method="sparsegpt", capture="rerun", progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


class _Encoder(nn.Module):
    """A tiny transformer encoder with layers in a ModuleList and a kwarg-only mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(2))
        self.lm_head = nn.Linear(32, 8)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=mask)
        return self.lm_head(h)


def test_transformer_encoder_every_method():
    torch.manual_seed(0)
    ids = [{"ids": torch.randint(0, 50, (4, 12)), "mask": torch.zeros(4, 12, dtype=torch.bool)} for _ in range(2)]
    for method, refine in [("wanda", None), ("sparsegpt", "snows"), ("magnitude", "lstsq")]:
        model = _Encoder().eval()
        result = prune(model, ids, sparsity=0.5, method=method, refine=refine, progress=False, refine_options=_fast(refine))
        names = [r.name for r in result.layers]
        assert "layers.0.linear1" in names and "lm_head" not in names and list(result.skipped) == ["lm_head"]
        assert {"layers.0.self_attn.in_proj_weight[q]", "layers.0.self_attn.out_proj.weight"} <= set(names)
        assert torch.isfinite(model(**ids[0])).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": 0.5, "method": "obs"}, "method"),
    ({"sparsity": 0.5, "refine": "adam"}, "refine"),
    ({"pattern": "2:3x"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.7}, "contradicts"),
    ({"sparsity": 0.5, "pattern": "2:4", "strict": True}, "multiple of 4"),
    ({"sparsity": 0.5, "method": "wanda", "calibration": []}, "empty"),
    ({"sparsity": 0.5, "method": "wanda", "calibration": [torch.randn(2, 3, 5, 5)]}, "calibration batch"),
    ({"sparsity": 0.5, "method": "wanda", "calibration": [torch.full((2, 1, 28, 28), float("nan"))]}, "NaN"),
    ({"sparsity": 0.5, "include": "nothing-matches"}, "no prunable"),
    ({"sparsity": 0.5, "refine": "snows", "refine_options": {"k": -1}}, "non-negative"),
    ({"sparsity": 0.5, "refine": "snows", "refine_options": {"kk": 3}}, "unknown snows option 'kk'; did you mean 'k'"),
    ({"sparsity": 0.5, "refine": "snows", "refine_options": {"max_cg": 0}}, "max_cg must be an integer >= 1"),
    ({"sparsity": 0.5, "method": "sparsegpt", "method_options": {"block_size": 0}}, "block_size must be an integer >= 1"),
    ({"sparsity": 0.5, "method": "sparsegpt", "method_options": {"damp": -0.1}}, "damp must be a number"),
    ({"sparsity": 0.5, "refine_options": {"k": 2}}, "without refine"),
    # found by the property tests (tests/test_properties_prune.py):
    ({"pattern": "2:4", "budget": "global"}, "fixes every layer's sparsity"),  # was silently uniform
    ({"pattern": "2:4", "budget": "bogus"}, "fixes every layer's sparsity"),
    ({"pattern": "2:4", "overrides": {"fc": 0.0}}, "fixes every layer's sparsity"),
    ({"sparsity": 0.5, "method": "wanda", "calibration": [torch.zeros(0, 1, 28, 28)]}, "no samples"),
    ({"sparsity": 0.5, "overrides": {"(": 0.5}}, "not a regular expression"),
    ({"sparsity": 0.5, "refine": "snows", "refine_options": {"epochs": 0}}, "epochs must be"),
    ({"sparsity": 0.5, "refine": "snows", "refine_options": {"shrink": 1.0}}, "shrink must be"),
    ({"sparsity": 0.5, "refine": "snows", "refine_options": {"damping": -1.0}}, "damping must be"),
    ({"pattern": "1:3", "method": "sparsegpt", "method_options": {"block_size": 128}}, "use 126 or leave it unset"),
])
def test_bad_input_is_refused_and_model_untouched(kwargs, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    kwargs = dict(kwargs)
    calibration = kwargs.pop("calibration", _data())
    with pytest.raises((ValueError, TypeError), match=match):
        prune(model, calibration, progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_later_batch_that_does_not_fit_is_named(method):
    # found by the property tests: only the first batch was checked, a later one gave a raw RuntimeError
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration batch 2"):
        prune(model, [torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5)], sparsity=0.5, method=method, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make", [lambda: small_cnn().to("meta"), lambda: nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))],
                         ids=["meta", "lazy"])
def test_weights_not_materialised_are_refused(make):
    # was "Tensor.item() cannot be called on meta tensors" (a RuntimeError)
    with pytest.raises(ValueError, match="no weights yet"):
        prune(make(), None, sparsity=0.5, progress=False)


def test_sparsegpt_default_block_fits_any_nm():
    # found by the property tests: 1:3 with the default block size of 128 was refused mid-run
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    prune(model, [torch.randn(8, 6)], pattern="1:3", method="sparsegpt", progress=False)
    assert check_nm(model[0].weight != 0, NM(1, 3)) and int((model[2].weight == 0).sum()) == 24


def test_nan_weights_refused():
    model = _model()
    with torch.no_grad():
        model[1].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune(model, None, sparsity=0.5, progress=False)


def test_failure_midway_restores_model(monkeypatch):
    import prunekit.oneshot.methods.lstsq as mod
    model = _model()
    before = copy.deepcopy(model.state_dict())
    calls = {"n": 0}
    real = mod.lstsq_refit

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, "lstsq_refit", flaky)
    with pytest.raises(KeyboardInterrupt):
        prune(model, _data(), sparsity=0.5, refine="lstsq", progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_progress_bars_show_only_when_asked(capsys):
    """Bars for calibration, layers and SNOWS steps with progress=True; nothing otherwise (and
    nothing by default when stderr is not a terminal, as under pytest)."""
    prune(_model(), _data(), sparsity=0.5, refine="snows", refine_options={"k": 1, "max_cg": 2}, progress=True)
    err = capsys.readouterr().err
    assert "calibrate" in err and "prune magnitude+snows" in err and "newton-cg" in err
    for progress in (False, None):
        prune(_model(), _data(), sparsity=0.5, refine="snows", refine_options={"k": 1, "max_cg": 2}, progress=progress)
        assert capsys.readouterr().err == ""


def test_grouped_statistics_equal_layer_by_layer(monkeypatch):
    """Layers that read one input share a statistics pass that stops once they have run; the
    result is the same as gathering statistics for each layer alone over whole forwards."""
    transformers = pytest.importorskip("transformers")
    import prunekit.oneshot.pipeline as pipeline
    from helpers.llama_toys import tiny_llama

    calib = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    grouped = tiny_llama(num_layers=2)
    prune(grouped, calib, sparsity=0.5, method="wanda", refine="lstsq", progress=False)
    monkeypatch.setattr(pipeline, "shared_input_groups", lambda block, layers, order, *a: ([[n] for n in order], False))
    alone = tiny_llama(num_layers=2)
    prune(alone, calib, sparsity=0.5, method="wanda", refine="lstsq", progress=False)
    for (name, a), b in zip(grouped.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_module_of_many_small_units_is_pruned_to_its_exact_count():
    # 16 depthwise kernels of 9 weights at 50%: 72 of 144 pruned (4 or 5 per kernel), not 4 of every 9
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(512, 4))
    result = prune(model, [torch.randn(2, 16, 8, 8)], sparsity=0.5, method="sparsegpt", progress=False)
    per_kernel = (model[0].weight == 0).flatten(1).sum(1)
    assert int(per_kernel.sum()) == 72 and set(per_kernel.tolist()) == {4, 5}
    assert result.sparsity == 0.5
