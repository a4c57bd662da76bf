"""nn.MultiheadAttention as four units: q, k, v rows of in_proj_weight and out_proj."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.layers.base import kind_of
from prunekit.sparsity.patterns import NM, check_nm

QKV = ("in_proj_weight[q]", "in_proj_weight[k]", "in_proj_weight[v]")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("separate", [False, True])
def test_each_units_columns_times_matrix_is_its_projection(batch_first, separate):
    torch.manual_seed(0)
    extra = {"kdim": 6, "vdim": 10} if separate else {}
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **extra).eval()
    kind = kind_of(mha)
    units = kind.units(mha)
    assert units == (("q_proj_weight", "k_proj_weight", "v_proj_weight") if separate else QKV) + ("out_proj.weight",)
    shape = (lambda n, d: (2, n, d)) if batch_first else (lambda n, d: (n, 2, d))
    q, k, v = torch.randn(shape(5, 8)), torch.randn(shape(7, extra.get("kdim", 8))), torch.randn(shape(7, extra.get("vdim", 8)))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    kwargs = {"key_padding_mask": pad, "need_weights": True}
    rows = kind.unit_inputs(mha, (q, k, v), kwargs, units)
    for unit, x in zip(units[:3], (q, k, v)):
        assert torch.equal(rows[unit], x.reshape(-1, x.shape[-1]))
    out = mha(q, k, v, **kwargs)[0]
    recomputed = rows["out_proj.weight"] @ kind.matrix(mha, "out_proj.weight").T + mha.out_proj.bias
    assert torch.allclose(recomputed, out.reshape(-1, 8), atol=1e-6)
    assert [kind.shape(mha, u) for u in units] == [(8, 8), (8, extra.get("kdim", 8)), (8, extra.get("vdim", 8)), (8, 8)]


def _by_hand(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` largest magnitudes of a matrix (the magnitude rule, computed here)."""
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[weight.abs().reshape(-1).topk(keep).indices] = True
    return mask.reshape(weight.shape)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_pruned_attention_is_the_dense_module_with_its_masks_applied_by_hand():
    torch.manual_seed(0)
    model = _Attn().eval()
    dense = copy.deepcopy(model.attn)
    result = pk.prune(model, None, sparsity=0.5, method="magnitude", progress=False)
    assert [r.name for r in result.layers] == [f"attn.{u}" for u in QKV] + ["attn.out_proj.weight"]
    with torch.no_grad():
        w = dense.in_proj_weight
        dense.in_proj_weight.copy_(torch.cat([w[i * 16:(i + 1) * 16] * _by_hand(w[i * 16:(i + 1) * 16], 128)
                                              for i in range(3)]))
        dense.out_proj.weight.mul_(_by_hand(dense.out_proj.weight, 128))
        x = torch.randn(2, 5, 16)
        assert torch.equal(model.attn(x, x, x)[0], dense(x, x, x)[0])
    assert set(model.state_dict()) == set(_Attn().state_dict())


def _vit() -> nn.Module:
    torch.manual_seed(0)

    class ViT(nn.Module):
        """Patch embedding conv, 4 encoder layers, mean pooling, head."""

        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, 16, 4, stride=4)
            self.pos = nn.Parameter(torch.randn(1, 16, 16) * 0.1)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                        for _ in range(4))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(1))

    return ViT().eval()


def _images(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 16, 16, generator=g) for _ in range(n)]


def _matrices(model):
    return {f"{n}.{u}" if u else n: kind_of(m).matrix(m, u) for n, m in pk.find_targets(model, types=None).items()
            for u in kind_of(m).units(m)}


RUNS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("magnitude", "lstsq"), ("wanda", "snows")]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method,refine", RUNS)
def test_vit_prunes_every_attention_unit_exactly(method, refine, pattern):
    model = _vit()
    keys = set(model.state_dict())
    opts = {"k": 1, "max_cg": 2, "max_steps": 1} if refine == "snows" else None
    result = pk.prune(model, _images(), sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                      method=method, refine=refine, refine_options=opts, progress=False)
    names = [r.name for r in result.layers]
    assert list(result.skipped) == ["head"]  # the patch conv's 16 columns (1 channel x 4 x 4) hold 2:4 groups
    assert len(names) == 4 * 6 + 1 and "layers.3.self_attn.in_proj_weight[v]" in names
    for name, matrix in _matrices(model).items():
        if name in names:
            assert int((matrix == 0).sum()) == matrix.numel() // 2, name
            if pattern == "2:4":
                assert check_nm(matrix, NM(2, 4)), name
    assert set(model.state_dict()) == keys and torch.isfinite(model(_images()[0])).all()
    assert torch.backends.mha.get_fastpath_enabled()



def test_calibration_sees_encoder_layers_that_take_the_fast_path():
    """In eval mode without grad an nn.TransformerEncoderLayer skips its attention module's
    forward (the fused fast path): the statistics must still come from the real inputs."""
    model = _vit()
    attn = model.layers[0].self_attn
    seen = []
    real = attn.forward
    attn.forward = lambda *a, **k: seen.append(1) or real(*a, **k)  # counts calls, unlike a hook keeps the fast path
    with torch.no_grad():
        model(_images()[0])
    assert not seen  # the fast path: the attention module is never called
    result = pk.prune(model, _images(), sparsity=0.5, method="sparsegpt", progress=False)
    assert len(seen) > 0
    errors = {r.name: r.error_selected for r in result.layers}
    assert all(errors[f"layers.0.self_attn.{u}"] > 0 for u in (*QKV, "out_proj.weight"))


def test_snows_on_the_vit_improves_the_attention_lookahead():
    model = _vit()
    result = pk.prune(model, _images(4), sparsity=0.5, method="magnitude", refine="snows",
                      refine_options={"k": 2, "max_cg": 10, "warm_start": "none"}, progress=False)
    attention = [r for r in result.layers if "self_attn" in r.name]
    assert len(attention) == 16 and all(r.lookahead_after <= r.lookahead_before for r in attention)
    assert sum(r.lookahead_after < 0.95 * r.lookahead_before for r in attention) >= 12


class _Cross(nn.Module):
    """Cross-attention with key and value widths of their own (separate q/k/v_proj_weight)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=12, vdim=4, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x, k, v):
        return self.head(self.attn(x, k, v, need_weights=False)[0])


@pytest.mark.parametrize("method,refine", [("sparsegpt", "lstsq"), ("wanda", "snows")])
def test_separate_projection_weights_are_units(method, refine):
    torch.manual_seed(0)
    model = _Cross().eval()
    calib = [(torch.randn(3, 5, 8), torch.randn(3, 6, 12), torch.randn(3, 6, 4)) for _ in range(3)]
    opts = {"k": 1, "max_cg": 2} if refine == "snows" else None
    result = pk.prune(model, calib, pattern="2:4", method=method, refine=refine, refine_options=opts, progress=False)
    units = ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")
    assert [r.name for r in result.layers] == [f"attn.{u}" for u in units]
    for unit in units:
        matrix = kind_of(model.attn).matrix(model.attn, unit)
        assert check_nm(matrix, NM(2, 4)) and int((matrix == 0).sum()) == matrix.numel() // 2


def test_a_failure_after_some_units_restores_every_attention_parameter():
    from prunekit.oneshot.registry import Method, Update, register, unregister

    @register(replace=True)
    class FailsOnV(Method):
        name = "fails-on-v"

        def choose(self, problem):
            if problem.name.endswith("[v]"):
                raise RuntimeError("boom")
            mask = problem.weight.abs() > problem.weight.abs().median()
            return Update(problem.weight * mask, mask)

    torch.manual_seed(0)
    model = _Attn().eval()
    before = copy.deepcopy(model.state_dict())
    try:
        with pytest.raises(RuntimeError, match="boom"):
            pk.prune(model, None, sparsity=0.5, method="fails-on-v", progress=False)
    finally:
        unregister("fails-on-v")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
