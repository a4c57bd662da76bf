"""SNOWS's lookahead: which operations are measured, the default or the user's choice."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.lookahead import Lookahead, is_measured, measured_rule


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _measured(model, spec):
    targets = {id(model[0]), id(model[2])}
    lookahead = Lookahead([("", model)], model[0], 8, targets, {}, {}, measured_rule(spec))
    try:
        return len(lookahead.handles)
    finally:
        lookahead.close()


def test_default_and_chosen_measured_operations():
    model = _mlp()
    assert measured_rule(None) is is_measured
    assert _measured(model, None) == 4  # layers 0 and 2 (the targets), ReLU, Tanh
    assert _measured(model, [nn.ReLU]) == 2  # the refit layer itself is always measured
    assert _measured(model, [r"^(3|4)$"]) == 3
    assert _measured(model, lambda name, module: isinstance(module, nn.Linear)) == 3
    assert not is_measured("layer.downsample.0", model[0], {id(model[0])})  # a shortcut


def test_the_choice_changes_the_refit():
    data = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    weights = []
    for measured in (None, [nn.Tanh]):
        model = _mlp()
        pk.prune(model, data, sparsity=0.6, refine="snows", include_head=True, progress=False,
                 refine_options={"k": 1, "max_cg": 10, "warm_start": "none", "measured": measured})
        weights.append(model[0].weight.detach().clone())
    assert torch.equal(weights[0] != 0, weights[1] != 0) and not torch.equal(weights[0], weights[1])


def test_a_bad_choice_is_refused():
    with pytest.raises(ValueError, match="measured entries must be nn.Module types or name regexes"):
        pk.prune(_mlp(), [torch.randn(4, 8)], sparsity=0.5, refine="snows", refine_options={"measured": [3]})


def _depthwise_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 6, 1)),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 3))


def _prune_depthwise(per_group, **options):
    model = _depthwise_net()
    data = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calls = []
    from prunekit.oneshot.methods import snows as method
    original = method.snows_refit

    def counted(*args, **kwargs):
        calls.append(kwargs["frozen"])
        return original(*args, **kwargs)
    method.snows_refit = counted
    try:
        result = pk.prune(model, data, sparsity=0.5, method="magnitude", refine="snows", include=r"^2\.0$",
                          refine_options={"k": 3, "max_cg": 10, "per_group": per_group, "warm_start": "none",
                                                          "relative_tol": True, **options}, progress=False)
    finally:
        method.snows_refit = original
    return model, result, calls


def test_depthwise_groups_are_refit_in_one_solve_nearly_as_well_as_one_by_one():
    # Per group, 8 solves take 8x the Newton steps; one joint solve lands within 1% of their loss.
    joint, result, calls = _prune_depthwise(False, epochs=3)
    each, result_each, calls_each = _prune_depthwise(True, epochs=3)
    assert len(calls) == 1 and calls[0] is None  # one solve, nothing frozen
    assert len(calls_each) == 8 and all(f is not None for f in calls_each)
    assert len(result.layers) == 8  # still one report row per group
    (before, after), = [(r.lookahead_before, r.lookahead_after) for r in result.layers if r.lookahead_after is not None]
    assert after < before
    assert after <= result_each.layers[-1].lookahead_after * 1.01
    w = joint[2][0].weight
    assert torch.equal(w == 0, each[2][0].weight == 0)  # the same support
    assert int((w == 0).sum()) == 36  # half of the 8 kernels' 72 weights (4 or 5 of each kernel's 9)
    assert torch.equal(joint[0].weight, each[0].weight)  # other layers untouched


def test_hessian_fraction_still_lowers_the_lookahead():
    _, result, _ = _prune_depthwise(False, hessian_fraction=0.25)
    (before, after), = [(r.lookahead_before, r.lookahead_after) for r in result.layers if r.lookahead_after is not None]
    assert after < before
    with pytest.raises(ValueError, match="hessian_fraction"):
        pk.prune(_depthwise_net(), [torch.randn(2, 3, 8, 8)], sparsity=0.5, refine="snows",
                 refine_options={"hessian_fraction": 0.0}, progress=False)
    with pytest.raises(ValueError, match="per_group"):
        pk.prune(_depthwise_net(), [torch.randn(2, 3, 8, 8)], sparsity=0.5, refine="snows",
                 refine_options={"per_group": "yes"}, progress=False)


def _products(model, layer, param, x, seed=0):
    """Exact and Gauss-Newton products of a lookahead loss (random targets: nonzero residuals) on
    a random support, for three random vectors, in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prunekit.oneshot.solvers.newton_cg import GaussNewtonHVP, MaskedHVP
    from prunekit.oneshot.lookahead import _owner, only_grad_for

    model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    targets = {id(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))}
    lookahead = Lookahead([("", model)], layer, 8, targets, {}, {})
    try:
        with torch.no_grad():
            wanted = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in lookahead.tensors((x,), {})]
        mask = torch.rand(param.shape, generator=gen, dtype=param.dtype) > 0.5
        with only_grad_for(model, param), sdpa_kernel([SDPBackend.MATH]):
            exact = MaskedHVP(lookahead.loss((x,), {}, targets=wanted), param, mask)
            gauss = GaussNewtonHVP(*lookahead.gauss_newton(*_owner(model, layer, param), (x,), {}), param, mask)
            vs = [torch.randn(param.shape, generator=gen, dtype=param.dtype) for _ in range(3)]
            return [(v * mask, exact(v), gauss(v)) for v in vs]
    finally:
        lookahead.close()


def _bn_relu_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 3))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_gauss_newton_is_the_exact_hessian_on_relu_networks():
    # Outputs piecewise linear in the one layer's weight (ReLU, ReLU6, BatchNorm in eval mode,
    # depthwise conv): the residual terms of the Hessian vanish, so J^T J v == H v.
    cnn, mlp = _bn_relu_cnn(), _mlp()
    mlp[3] = nn.ReLU()
    cases = [(cnn, cnn[3], torch.randn(4, 3, 8, 8)), (cnn, cnn[0], torch.randn(4, 3, 8, 8)),
             (mlp, mlp[0], torch.randn(32, 8))]
    for model, layer, x in cases:
        for v, exact, gauss in _products(model, layer, layer.weight, x.double()):
            assert exact.abs().max() > 0
            assert (exact - gauss).abs().max() <= 1e-6 * exact.abs().max()
            assert torch.count_nonzero(gauss[v == 0]) == 0  # off the support


class _TwoBranches(nn.Module):
    """The refit layer ``a`` and a measured layer ``b`` that does not depend on it (as k_proj after
    q_proj): its output has no tangent, and the products must still pair each output with its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        a = self.a(x)
        return self.c(self.act(a + self.b(x)))


def test_gauss_newton_pairs_outputs_with_their_own_tangents():
    torch.manual_seed(0)
    model = _TwoBranches()
    for v, exact, gauss in _products(model, model.a, model.a.weight, torch.randn(16, 8, dtype=torch.float64)):
        assert (exact - gauss).abs().max() <= 1e-6 * exact.abs().max()


def test_gauss_newton_on_attention_is_positive_semidefinite_and_not_the_hessian():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu", batch_first=True)
    attention = model.self_attn
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for param in (attention.in_proj_weight, attention.out_proj.weight):
        products = _products(model, attention, param, x)
        assert all(float((v * gauss).sum()) >= 0 for v, _, gauss in products)
        assert any((exact - gauss).abs().max() > 1e-3 * exact.abs().max() for _, exact, gauss in products)


def _encoder_lookahead(hvp):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu", batch_first=True), 1,
        enable_nested_tensor=False), nn.Linear(16, 3))
    data = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = pk.prune(encoder, data, sparsity=0.5, method="magnitude", refine="snows", progress=False,
                      refine_options={"k": 2, "max_cg": 10, "warm_start": "none", "hvp": hvp})
    assert len([r for r in result.layers if "self_attn" in r.name]) == 4  # q, k, v, out_proj
    assert all(r.lookahead_after <= r.lookahead_before for r in result.layers)
    return sum(r.lookahead_before for r in result.layers), sum(r.lookahead_after for r in result.layers)


def test_snows_with_gauss_newton_lowers_the_lookahead_on_attention_and_depthwise():
    (before, after), (_, exact) = _encoder_lookahead("gauss_newton"), _encoder_lookahead("exact")
    assert after < 0.98 * before and after <= 1.02 * exact  # softmax, GELU: G is not H, and still works
    _, result, calls = _prune_depthwise(False, hvp="gauss_newton", hessian_fraction=0.5)
    (before, after), = [(r.lookahead_before, r.lookahead_after) for r in result.layers if r.lookahead_after is not None]
    assert after < before and len(calls) == 1
    with pytest.raises(ValueError, match="hvp must be one of 'exact', 'gauss_newton'"):
        pk.prune(_depthwise_net(), [torch.randn(2, 3, 8, 8)], sparsity=0.5, refine="snows",
                 refine_options={"hvp": "fisher"}, progress=False)


def test_auto_hessian_fraction_subsamples_only_conv_blocks_of_large_images():
    from prunekit.oneshot.methods.snows import LARGE_INPUT, SnowsOptions, auto_hessian_fraction

    def call(*shape):
        return [((torch.zeros(*shape),), {})]
    assert SnowsOptions().hessian_fraction == "auto"
    imagenet = (3, 224, 224)  # 150,528 elements per image
    assert auto_hessian_fraction(call(4, 3, 224, 224), imagenet) == 0.25
    assert auto_hessian_fraction(call(4, 384, 7, 7), imagenet) == 0.25  # every conv block of that network
    assert auto_hessian_fraction(call(4, 197, 768), imagenet) == 1.0  # a ViT's token blocks keep whole batches
    assert auto_hessian_fraction(call(4, 16, 28, 28), (1, 28, 28)) == 1.0  # MNIST-size images
    assert auto_hessian_fraction(call(4, 256, 576), (256,)) == 1.0  # token ids
    assert LARGE_INPUT == 256 * 256
    assert auto_hessian_fraction(call(4, 8, 64, 64), (1, 256, 256)) == 0.25  # the threshold itself
    assert auto_hessian_fraction(call(4, 8, 64, 64), (1, 255, 256)) == 1.0
    assert auto_hessian_fraction([], imagenet) == 1.0 and auto_hessian_fraction(call(4, 3, 8, 8), None) == 1.0
    assert SnowsOptions().solver(call(2, 3, 224, 224), imagenet).hessian_fraction == 0.25
    assert SnowsOptions(hessian_fraction=0.5).solver(call(2, 3, 224, 224), imagenet).hessian_fraction == 0.5
    with pytest.raises(ValueError, match="hessian_fraction must be 'auto' or a number"):
        SnowsOptions(hessian_fraction="half")


def test_prune_passes_the_model_input_shape_to_the_refit(monkeypatch):
    from prunekit.oneshot import snows_options
    seen, original = [], snows_options.auto_hessian_fraction

    def spy(inputs, model_input):
        seen.append(model_input)
        return original(inputs, model_input)
    monkeypatch.setattr(snows_options, "auto_hessian_fraction", spy)
    pk.prune(_depthwise_net(), [torch.randn(4, 3, 8, 8) for _ in range(2)], sparsity=0.5, refine="snows",
             refine_options={"k": 1, "max_cg": 2}, progress=False)
    assert seen and set(seen) == {(3, 8, 8)}


def _warm_started(monkeypatch, slowdown):
    """SNOWS from the least-squares warm start, exact (slowdown 0) or by CG (the exact solve made to look dear)."""
    from prunekit.oneshot.solvers import lstsq_cg
    monkeypatch.setattr(lstsq_cg, "EXACT_SLOWDOWN", slowdown)
    model = _depthwise_net()
    data = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = pk.prune(model, data, sparsity=0.5, method="magnitude", refine="snows", progress=False,
                      refine_options={"k": 2, "max_cg": 10, "warm_start": "lstsq", "hessian_fraction": 1.0})
    return [(r.lookahead_before, r.lookahead_after) for r in result.layers if r.lookahead_after is not None]


def test_the_cg_warm_start_gives_snows_the_loss_of_the_exact_one(monkeypatch):
    exact, by_cg = _warm_started(monkeypatch, 0.0), _warm_started(monkeypatch, 1e12)
    assert len(exact) == len(by_cg) == 3  # the stem, the depthwise layer (one joint solve), the 1x1
    for (b_exact, a_exact), (b_cg, a_cg) in zip(exact, by_cg):
        # the lookahead loss of the warm start itself (the masked start, warm_start="none", is 0.7-20% higher)
        assert b_cg == pytest.approx(b_exact, rel=1e-3)
        assert a_cg <= a_exact * 1.02 + 1e-7
