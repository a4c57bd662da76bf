import json

import pytest
import torch
from torch import nn

from prunekit.report import PER_FORWARD, PER_POSITION, LayerStat, human_count, human_flops, model_report


def tiny() -> nn.Sequential:
    """Conv2d(2->3, k=3, 54 weights + 3 bias) and Linear(12->4, 48 weights + 4 bias), known zeros."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) + 0.1)  # strictly non-zero
        m[0].weight[0] = 0.0  # 18 zeros of 54
        m[3].weight[:, :6] = 0.0  # 24 zeros of 48
        m[3].bias[0] = 0.0  # a zero outside the prunable weights
    return m


def test_counts_and_sparsity():
    r = model_report(tiny())
    assert [(s.name, s.kind, s.shape) for s in r.layers] == [("0", "Conv2d", (3, 2, 3, 3)), ("3", "Linear", (4, 12))]
    assert [(s.params, s.nonzeros) for s in r.layers] == [(54, 36), (48, 24)]
    assert r.layers[0].sparsity == pytest.approx(1 / 3) and r.layers[1].sparsity == pytest.approx(0.5)
    assert (r.params, r.nonzeros) == (102, 60)
    assert r.sparsity == pytest.approx(42 / 102)
    assert (r.total_params, r.total_nonzeros) == (54 + 3 + 48 + 4, 36 + 3 + 24 + 3)


def test_head_and_filters():
    assert [s.name for s in model_report(tiny(), include_head=False).layers] == ["0"]
    assert [s.name for s in model_report(tiny(), exclude="0").layers] == ["3"]
    assert [s.name for s in model_report(tiny(), types=(nn.Linear,)).layers] == ["3"]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5, bias=False)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.b(self.a(x)))


def test_tied_parameters_counted_once():
    m = Tied()
    with torch.no_grad():
        m.a.weight[0] = 0.0
    r = model_report(m)
    assert [s.name for s in r.layers] == ["a", "out"]
    assert r.total_params == 25 + 10 + 2
    assert r.layers[0].nonzeros == 20
    # with an input, the tied weight's compute is counted for both uses: 2 * 25 MACs-as-FLOPs * 3 rows * 2 calls
    r = model_report(m, torch.randn(3, 5))
    assert r.layers[0].flops_dense == 2 * 25 * 3 * 2 and r.layers[0].flops_sparse == 2 * 20 * 3 * 2


def test_flops_per_position():
    r = model_report(tiny())
    assert r.flops_unit == PER_POSITION
    conv, lin = r.layers
    assert conv.flops_dense == 2 * (2 // 1) * 3 * 3 * 3 and conv.flops_sparse == 2 * 36  # 2*C_in/g*k*k*C_out
    assert lin.flops_dense == 2 * 12 * 4 and lin.flops_sparse == 2 * 24
    assert r.flops_dense == conv.flops_dense + lin.flops_dense


def test_flops_with_example_input():
    x = torch.randn(5, 2, 4, 4)  # conv output 5 x 3 x 2 x 2 -> 20 positions; linear 5 rows
    r = model_report(tiny(), x)
    assert r.flops_unit == PER_FORWARD
    conv, lin = r.layers
    assert (conv.flops_dense, conv.flops_sparse) == (2 * 2 * 9 * 3 * 20, 2 * 36 * 20)
    assert (lin.flops_dense, lin.flops_sparse) == (2 * 12 * 4 * 5, 2 * 24 * 5)
    # tuple and mapping inputs are called as model(*x) and model(**x)
    assert model_report(tiny(), (x,)).flops_dense == r.flops_dense
    assert model_report(tiny(), {"input": x}).flops_dense == r.flops_dense


def test_grouped_conv_and_linear_on_sequences():
    m = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.Flatten(2), nn.Linear(9, 7))
    r = model_report(m, torch.randn(1, 4, 3, 3))
    conv, lin = r.layers
    assert conv.flops_dense == 2 * (4 // 2) * 9 * 6 * 9  # 9 output pixels
    assert lin.flops_dense == 2 * 9 * 7 * 6  # 1 x 6 rows of 9 features


def test_model_unchanged():
    m = tiny().train()
    m[1].eval()  # a mixed mode must be restored per module
    before = {k: v.clone() for k, v in m.state_dict().items()}
    model_report(m, torch.randn(2, 2, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert [mod.training for mod in m.modules()] == [True, True, False, True, True]
    assert all(not mod._forward_hooks for mod in m.modules())


def test_hooks_removed_on_error():
    m = tiny().train()
    with pytest.raises(RuntimeError):
        model_report(m, torch.randn(2, 5, 4, 4))  # wrong channel count
    assert all(not mod._forward_hooks for mod in m.modules())
    assert all(mod.training for mod in m.modules())


def test_outputs_contain_numbers():
    r = model_report(tiny(), torch.randn(5, 2, 4, 4))
    d = json.loads(r.to_json())
    assert d["layers"][0]["shape"] == [3, 2, 3, 3] and d["layers"][1]["nonzeros"] == 24
    assert d["layers"][1]["sparsity"] == pytest.approx(0.5)
    assert (d["total_params"], d["total_nonzeros"], d["flops_dense"]) == (109, 66, 2160 + 480)
    assert d["flops_unit"] == PER_FORWARD
    md = r.to_markdown()
    assert "| 0 | Conv2d | 3x2x3x3 | 54 | 36 | 33.33% | 2160 | 1440 |" in md
    assert "| 3 | Linear | 4x12 | 48 | 24 | 50.00% | 480 | 240 |" in md
    assert "60 of 102" in md and "66 of 109" in md and "41.18%" in md
    term = r.to_terminal()
    lines = term.splitlines()
    assert len({len(line) for line in lines[2:4]}) == 1  # rows aligned
    assert "2.16 kFLOP" in term and "1.44 kFLOP" in term and "240 FLOP" in term and "50.00%" in term


def test_empty_and_zero_layer():
    assert LayerStat("x", "Linear", (0, 3), 0, 0, 0, 0).sparsity == 0.0
    r = model_report(nn.Sequential(nn.ReLU()))
    assert r.layers == [] and r.sparsity == 0.0 and "Total" in r.to_markdown() and "Total" in r.to_terminal()


def test_human_units():
    assert [human_count(n) for n in (0, 12, 999, 1000, 456_700, 999_960, 1_234_567, 4_560_000_000)] == \
        ["0", "12", "999", "1.0k", "456.7k", "1.00M", "1.23M", "4.56B"]
    assert [human_flops(n) for n in (12, 1080, 3.4e9, 999_999, 2.5e12)] == \
        ["12 FLOP", "1.08 kFLOP", "3.40 GFLOP", "1.00 MFLOP", "2.50 TFLOP"]


def test_fused_experts_flops_count_each_expert_on_its_routed_tokens():
    """Oracle by hand: every token runs exactly its top-2 experts, each (token, expert) pair one
    expert's multiply-adds (2 FLOPs per weight); zeros are skipped."""
    pytest.importorskip("transformers")
    from helpers.moe_toys import tiny_moe, token_batches

    model = tiny_moe("mixtral", num_layers=1, experts=4)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.down_proj[:, :, :16] = 0.0  # every expert half zero
    ids = token_batches(n=1)[0]
    report = {s.name: s for s in model_report(model, example_inputs=ids).layers}
    pairs = ids.numel() * 2  # top-2 of 4 experts for each token
    down = report["model.layers.0.mlp.experts.down_proj"]
    assert down.flops_dense == 2 * 32 * 32 * pairs and down.flops_sparse == 32 * 32 * pairs
    assert report["model.layers.0.mlp.experts.gate_up_proj"].flops_dense == 2 * 64 * 32 * pairs
