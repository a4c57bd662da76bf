"""What prune() expects pruned (prunekit.oneshot.coverage): gaps, the user's exclusions, routers,
and a Mixtral whose fused experts no layer kind reads (a transposed layout) reported as it is."""
import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.blocks import find_blocks
from prunekit.oneshot.coverage import find_gaps


class _Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.experts = nn.Parameter(torch.randn(2, 4, 4))
        self.scale = nn.Parameter(torch.ones(4))  # 1-D: never a weight expected pruned

    def forward(self, x):
        return torch.einsum("bd,edk->bk", self.fc(x), self.experts) * self.scale


def test_gaps_are_the_unhandled_weights_the_options_do_not_leave_out():
    torch.manual_seed(0)
    model = nn.Sequential(_Fused(), _Fused(), nn.Linear(4, 2))
    blocks = find_blocks(model)
    assert list(find_gaps(model, blocks)) == ["0.experts", "1.experts"]
    assert "3-D parameter (2, 4, 4) of _Fused" in find_gaps(model, blocks)["0.experts"]
    assert list(find_gaps(model, blocks, exclude=r"^0\.")) == ["1.experts"]
    assert list(find_gaps(model, blocks, include="experts")) == ["0.experts", "1.experts"]
    assert list(find_gaps(model, blocks, include="fc")) == []


def test_exclude_leaves_a_gap_out_of_the_count_and_strict_passes():
    torch.manual_seed(0)
    model = nn.Sequential(_Fused(), _Fused(), nn.Linear(4, 2))
    data = [torch.randn(8, 4)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"strict=True: '0.experts' is a 3-D parameter.*exclude='0.experts'"):
        pk.prune(model, data, sparsity=0.5, method="wanda", strict=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    result = pk.prune(model, data, sparsity=0.5, method="wanda", strict=True, exclude="experts", progress=False)
    assert set(result.weights) == {"0.fc.weight", "1.fc.weight"} and result.sparsity == 0.5


class _Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 2, bias=False)  # a router: named so, beside experts
        self.experts = _Fused()

    def forward(self, x):
        return self.experts(x) * torch.softmax(self.router(x), -1).sum(-1, keepdim=True)


def test_routers_are_neither_targets_nor_gaps():
    model = nn.Sequential(_Routed(), nn.Linear(4, 2))
    assert list(find_gaps(model, find_blocks(model))) == ["0.experts.experts"]


def test_a_mixtral_whose_experts_no_kind_reads_reports_them_dense():
    """Fused experts in a layout no layer kind reads (transformers' ``is_transposed`` flag; the
    eager forward ignores it) are left dense: result.sparsity says so, with a warning."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True
    data = [{"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}]
    with pytest.warns(UserWarning, match=r"dense: 'model.layers.0.mlp.experts.gate_up_proj': a 3-D parameter"):
        result = pk.prune(model, data, sparsity=0.5, method="magnitude", progress=False)
    layers = [p for n, p in model.model.layers.named_parameters() if p.dim() >= 2 and ".gate.weight" not in n]
    counted = sum(int((p == 0).sum()) for p in layers) / sum(p.numel() for p in layers)
    assert result.sparsity == counted < 0.1 and result.layers_sparsity == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "expected pruned are zero" in result.summary()


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_offloaded_gaps_are_counted_from_their_storage(tmp_path, how):
    """A gap offloaded by accelerate sits on the meta device: its zeros are read where it is kept."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = nn.Sequential(_Fused(), _Fused(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].experts[0].zero_()  # 16 of the 32 entries
    plain = copy.deepcopy(model)
    data = [torch.randn(8, 4)]
    kwargs = {"offload_dir": str(tmp_path)} if how == "disk_offload" else {}
    model = getattr(accelerate, how)(model, execution_device="cpu", **kwargs)
    assert model[0].experts.is_meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pk.prune(model, data, sparsity=0.5, method="magnitude", progress=False)
        expected = pk.prune(plain, data, sparsity=0.5, method="magnitude", progress=False)
    assert result.weights == expected.weights and result.weights["0.experts"] == (16, 32)
