"""Layer kinds: the [d_out, d_in] view of each module type and its input columns."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.layers.targets import DEFAULT_TYPES
from prunekit.layers.base import LayerKind, kind_of, kinds, prunable_types, register_kind, unregister_kind
from prunekit.sparsity.patterns import NM, check_nm


def test_linear_and_conv_are_the_default_targets():
    assert [k.name for k in kinds()][:2] == ["linear", "conv"]
    assert DEFAULT_TYPES == (nn.Linear, nn.Conv1d, nn.Conv2d)  # written out, not a registration-order slice
    assert set(DEFAULT_TYPES) <= set(prunable_types())
    assert kind_of(nn.Conv2d(2, 3, 3)).name == "conv"
    assert kind_of(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3)).name == "linear"  # a subclass
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert kind_of(grouped).units(grouped) == ("weight[g0]", "weight[g1]")


@pytest.mark.parametrize("module,x", [
    (nn.Linear(6, 4, bias=False), torch.randn(2, 5, 6)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), torch.randn(2, 3, 7, 7)),
    (nn.Conv1d(3, 4, 3, padding=2, dilation=2, padding_mode="circular", bias=False), torch.randn(2, 3, 9))])
def test_columns_times_matrix_is_the_forward(module, x):
    kind = kind_of(module)
    (unit,) = kind.units(module)
    out = kind.input_columns(module, (x,), unit) @ kind.matrix(module, unit).T
    ref = module(x)
    ref = ref.reshape(-1, ref.shape[-1]) if isinstance(module, nn.Linear) else ref.movedim(1, -1).reshape(-1, ref.shape[1])
    assert torch.allclose(out, ref, atol=1e-5)


def test_unknown_type_names_the_known_kinds():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match=r"no layer kind handles 'Conv3d'; known kinds: linear \(Linear\), conv"):
        pk.prune(model, None, sparsity=0.5, types=(nn.Conv3d,))


class TLinear(nn.Module):
    """A linear layer storing its weight transposed, [d_in, d_out] (like transformers' Conv1D)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))

    def forward(self, x):
        return x @ self.weight


class TransposedKind(LayerKind):
    name = "transposed-test"
    types = (TLinear,)

    def matrix(self, module, unit=""):
        return module.weight.detach().T

    def weight_mask(self, module, mask, unit=""):
        return mask.T

    @torch.no_grad()
    def write(self, module, matrix, unit=""):
        module.weight.copy_(matrix.T.to(module.weight.dtype))

    def input_columns(self, module, args, unit=""):
        return args[0].reshape(-1, args[0].shape[-1])


def test_a_new_kind_is_an_entry_not_a_branch():
    register_kind(TransposedKind())
    try:
        with pytest.raises(TypeError, match="already registered"):
            register_kind(TransposedKind())
        torch.manual_seed(0)
        model = nn.Sequential(TLinear(8, 16), nn.ReLU(), TLinear(16, 4), nn.ReLU(), nn.Linear(4, 2))
        data = [torch.randn(32, 8) for _ in range(2)]
        for method in ("magnitude", "wanda", "sparsegpt"):
            m = copy.deepcopy(model)
            result = pk.prune(m, data, pattern="2:4", method=method, refine="lstsq",
                              types=(TLinear,), include_head=True, progress=False)
            assert [r.name for r in result.layers] == ["0", "2"]
            for i in (0, 2):  # 2:4 along the input axis: the rows of the stored [d_in, d_out] weight
                assert check_nm(m[i].weight.T != 0, NM(2, 4))
                assert int((m[i].weight == 0).sum()) == m[i].weight.numel() // 2
    finally:
        unregister_kind("transposed-test")
    with pytest.raises(ValueError, match="no layer kind handles 'TLinear'"):
        pk.find_targets(model, types=(TLinear,))


# -- grouped and depthwise convolutions: one unit per group ------------------------------------

def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),  # 8 input channels per group
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def _images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def _group_blocks(conv):
    per = conv.out_channels // conv.groups
    return [conv.weight.detach()[g * per:(g + 1) * per] for g in range(conv.groups)]


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False),
                                  nn.Conv2d(4, 4, 3, groups=4, stride=2, bias=False),
                                  nn.Conv1d(6, 3, 2, groups=3, bias=False)])
def test_each_group_columns_times_matrix_is_that_groups_output(conv):
    kind = kind_of(conv)
    x = torch.randn(2, conv.in_channels, *(7,) * (conv.weight.dim() - 2))
    out = conv(x).movedim(1, -1)
    rows = kind.unit_inputs(conv, (x,), {}, kind.units(conv))
    per = conv.out_channels // conv.groups
    assert len(rows) == conv.groups
    for g, unit in enumerate(kind.units(conv)):
        assert kind.shape(conv, unit) == (per, conv.in_channels // conv.groups, *conv.kernel_size)
        ref = out[..., g * per:(g + 1) * per].reshape(-1, per)
        assert torch.allclose(rows[unit] @ kind.matrix(conv, unit).T, ref, atol=1e-5)


@pytest.mark.parametrize("groups", [2, 4])  # 4: depthwise
def test_grouped_least_squares_matches_a_dense_solve_per_group(groups):
    """Oracle: each group's design matrix built by convolving its own input channels with
    one-hot kernels (no unfold), then an exact least-squares solve of every row on its kept
    columns; every group loses exactly half of its weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=groups), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    images = [torch.randn(4, 4, 6, 6) for _ in range(3)]
    conv = model[0]
    dense = conv.weight.detach().clone()
    result = pk.prune(model, images, sparsity=0.5, method="magnitude", refine="lstsq", refine_options={"damp": 0.0},
                      progress=False)
    assert [r.name for r in result.layers] == [f"0.weight[g{g}]" for g in range(groups)]
    x = torch.cat(images).double()
    c, per = 4 // groups, 4 // groups  # input and output channels per group
    basis = torch.eye(c * 9, dtype=torch.float64).reshape(-1, c, 3, 3)
    for g in range(groups):
        design = F.conv2d(x[:, g * c:(g + 1) * c], basis, padding=1).movedim(1, -1).reshape(-1, c * 9)
        w = conv.weight.detach()[g * per:(g + 1) * per].double().reshape(per, -1)
        w0 = dense[g * per:(g + 1) * per].double().reshape(per, -1)
        assert int((w == 0).sum()) in (w.numel() // 2, (w.numel() + 1) // 2), g  # the module's count is exact
        for row in range(per):
            kept = w[row] != 0
            sol = torch.linalg.lstsq(design[:, kept], design @ w0[row]).solution
            assert torch.allclose(w[row, kept], sol, atol=1e-5), (g, row)


@pytest.mark.parametrize("method,refine", [("magnitude", None), ("wanda", None), ("sparsegpt", None),
                                           ("wanda", "lstsq"), ("magnitude", "snows")])
def test_every_method_prunes_each_group_exactly(method, refine):
    model, images = _cnn(), _images()
    # no least-squares warm start: it zeroes the weights of inputs dead on this random network
    opts = {"k": 2, "max_cg": 3, "epochs": 1, "warm_start": "none"} if refine == "snows" else None
    result = pk.prune(model, images, sparsity=0.5, method=method, refine=refine, refine_options=opts, progress=False)
    names = [r.name for r in result.layers]
    assert names[:1] == ["0"] and "2.weight[g7]" in names and "6.weight[g1]" in names and len(names) == 1 + 8 + 1 + 2
    for conv in (model[2], model[6]):
        for block in _group_blocks(conv):  # each group within one of half its size; the module exactly half
            assert int((block == 0).sum()) in (block.numel() // 2, (block.numel() + 1) // 2)
        assert int((conv.weight == 0).sum()) == round(0.5 * conv.weight.numel())
    if refine == "snows":  # a grouped conv is one solve, reported on its last group's row
        solved = [r for r in result.layers if r.lookahead_after is not None]
        assert [r.name for r in solved] == ["0", "2.weight[g7]", "4", "6.weight[g1]"]
        assert all(r.lookahead_after <= r.lookahead_before for r in solved)
        assert any(r.lookahead_after < r.lookahead_before for r in solved if "[g" in r.name)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_nm_runs_along_each_groups_input_channels_and_skips_depthwise(method):
    model, images = _cnn(), _images()
    with pytest.warns(UserWarning, match="depthwise kernel"):
        result = pk.prune(model, images, pattern="2:4", method=method, progress=False)
    assert set(result.skipped) == {"0", "2", "10"} and result.skipped["2"].startswith("depthwise kernel")
    assert "input dimension 27 is not a multiple of 4" in result.skipped["0"]
    w = model[6].weight.detach()  # [16, 8, 3, 3]: groups of 4 input channels at each kernel position
    groups = w.permute(0, 2, 3, 1).reshape(16, 3, 3, 2, 4)
    assert int((groups != 0).sum(-1).max()) <= 2 and int((w == 0).sum()) == w.numel() // 2


def test_depthwise_nm_under_strict_is_an_error_and_the_model_is_unchanged():
    model, images = _cnn(), _images()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer '2' cannot be pruned with pattern 2:4: depthwise kernel"):
        pk.prune(model, images, pattern="2:4", method="sparsegpt", exclude=r"^0$", strict=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_include_naming_a_layer_no_kind_handles_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv3d(1, 1, 1), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"include='1' selects '1', a Conv3d, which no layer kind handles; "
                                         r"known kinds: linear \(Linear\), conv \(Conv1d/Conv2d\), attention"):
        pk.prune(model, None, sparsity=0.5, include="1")
    with pytest.raises(ValueError, match=r"include='\^0\$' selects '0', a Linear \(layer kind 'linear'\), which types="):
        pk.prune(model, None, sparsity=0.5, include="^0$", types=(nn.Conv2d,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [r.name for r in pk.prune(model, None, sparsity=0.5, include="^0$").layers] == ["0"]
