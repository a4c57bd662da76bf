"""prunekit.accelerate: sparse kernels only where measured faster, outputs within tolerance."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.accelerate import SparseLinear, accelerate
from prunekit.formats.compact import save


def mlp(sparsity: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    if sparsity:
        pk.MaskSet({n: pk.unstructured_mask(m.weight.abs(), sparsity) for n, m in pk.find_targets(model).items()}).apply(model)
    return model


def check_invariants(report, model, x, ref):
    rtol, atol = report.tolerance
    for layer in report.layers:
        if layer.chosen != "dense":
            assert layer.kernels_ms[layer.chosen] < layer.dense_ms * 0.9  # faster by the margin, measured
            assert isinstance(model.get_submodule(layer.name), SparseLinear)
        else:
            assert type(model.get_submodule(layer.name)) is nn.Linear
    if report.swapped:
        assert report.model_accelerated_ms < report.model_dense_ms and report.reverted is None
    with torch.no_grad():
        assert (model(x) - ref).abs().max() <= atol + rtol * ref.abs().max()


def test_high_sparsity_swaps_only_measured_wins(tmp_path):
    model, x = mlp(0.95), torch.randn(128, 256)
    with torch.no_grad():
        ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = accelerate(model, x, repeats=3)
    assert [r.name for r in report.layers] == ["0", "2"]  # the head was never pruned
    assert all(isinstance(r.kernels_ms["csr"], float) for r in report.layers)
    check_invariants(report, model, x, ref)
    assert "model: dense" in report.summary()
    # the state_dict is untouched, so a compressed save still works
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    save(model, tmp_path / "m.safetensors")
    report.undo()
    assert all(type(m) is not SparseLinear for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_low_sparsity_keeps_dense():
    model, x = mlp(0.1), torch.randn(64, 256)
    with torch.no_grad():
        ref = model(x)
    report = accelerate(model, x, repeats=3, kernels=("csr",))
    check_invariants(report, model, x, ref)
    assert len(report.layers) == 2


def test_no_pruned_layers_warns_and_leaves_model_alone():
    model, x = mlp(0.0), torch.randn(8, 256)
    with pytest.warns(RuntimeWarning, match="no pruned Linear"):
        report = accelerate(model, x)
    assert report.layers == [] and report.swapped == []
    assert all(type(m) is not SparseLinear for m in model.modules())


def test_bad_input_leaves_model_unchanged():
    model, x = mlp(0.95), torch.randn(32, 256)
    with pytest.raises(ValueError, match="unknown kernels"):
        accelerate(model, x, kernels=("magic",))
    with pytest.raises(TypeError):
        accelerate(model, "not an input", repeats=1)  # the forward fails: nothing swapped
    assert all(type(m) is not SparseLinear for m in model.modules())


def test_mapping_inputs_and_bias_free_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64, bias=False)
            self.b = nn.Linear(64, 8)

        def forward(self, x, scale=1.0):
            return self.b(self.a(x) * scale)

    torch.manual_seed(0)
    net = Net().eval()
    pk.MaskSet({"a": pk.unstructured_mask(net.a.weight.abs(), 0.9)}).apply(net)
    x = torch.randn(3, 5, 64)
    sparse = SparseLinear(net.a, "csr")
    with torch.no_grad():
        assert torch.allclose(sparse(x), net.a(x), atol=1e-5)
        ref = net(x, scale=2.0)
    accelerate(net, {"x": x, "scale": 2.0}, repeats=3)
    with torch.no_grad():
        assert torch.allclose(net(x, scale=2.0), ref, atol=1e-4)
    assert list(net.state_dict()) == ["a.weight", "b.weight", "b.bias"]


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                    reason="2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0")
def test_semi_structured_on_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(),
                          nn.Linear(1024, 8)).half().cuda().eval()
    for name, m in pk.find_targets(model).items():
        with torch.no_grad():
            m.weight.mul_(pk.nm_mask(m.weight.float().abs(), pk.NM(2, 4)).half())
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = model(x)
    report = accelerate(model, x, kernels=("semi_structured",), rtol=1e-2, atol=1e-2)
    assert all(isinstance(r.kernels_ms["semi_structured"], float) for r in report.layers), report.summary()
    check_invariants(report, model, x, ref)
