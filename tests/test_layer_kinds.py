"""Layer kinds: the [d_out, d_in] view of each module type and its input columns."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.layer_kinds import LayerKind, kind_of, kinds, prunable_types, register_kind, unregister_kind
from prunekit.patterns import NM, check_nm


def test_linear_and_conv_are_the_default_targets():
    assert [k.name for k in kinds()][:2] == ["linear", "conv"]
    assert pk.targets.DEFAULT_TYPES == prunable_types()[:3] == (nn.Linear, nn.Conv1d, nn.Conv2d)
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
