"""Routers and shared-expert gates are never targets by default (prunekit.layers.routers)."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.layers.routers import ROUTER_REASON, is_listed_expert, is_router
from prunekit.layers.targets import find_targets, prunable


class _OldMoE(nn.Module):
    """The per-expert ``nn.Linear`` layout of older Mixtral code: a Linear router named ``gate``."""

    def __init__(self, d: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = torch.softmax(self.gate(x), -1).topk(1, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (index[:, 0] == e).nonzero().squeeze(1)
            if len(rows):  # as older Mixtral code: an expert no token chose is never called
                out[rows] += weights[rows] * expert(x[rows])
        return out


class _GatedMLP(nn.Module):
    """A ``gate`` that is an ordinary projection: no experts beside it."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.gate = nn.Linear(d, 16)
        self.down = nn.Linear(16, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)))


def test_a_gate_is_a_router_only_beside_experts():
    moe, mlp = _OldMoE(), _GatedMLP()
    assert is_router("moe.gate", moe.gate, moe) and not is_router("mlp.gate", mlp.gate, mlp)
    assert is_router("mlp.shared_expert_gate", nn.Linear(8, 1), nn.Module())
    assert not is_router("mlp.gate_proj", nn.Linear(8, 8), moe)

    class MixtralTopKRouter(nn.Module):
        pass

    assert is_router("mlp.gate", MixtralTopKRouter())


def test_old_layout_router_is_left_dense_and_its_experts_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(_OldMoE(), _GatedMLP(), nn.Linear(8, 3))
    found = prunable(model, types=None)
    assert "0.gate" not in found.layers and found.skipped["0.gate"] == ROUTER_REASON
    assert {"0.experts.0", "1.gate", "1.down"} <= set(found.layers)
    assert "0.gate" in find_targets(model, types=None, include=r"^0\.gate$")  # naming it prunes it
    router = model[0].gate.weight.detach().clone()
    result = pk.prune(model, [torch.randn(16, 8)], method="wanda", sparsity=0.5, progress=False)
    assert torch.equal(model[0].gate.weight, router) and "0.gate.weight" not in result.weights
    assert result.sparsity == 0.5 and int((model[0].experts[1].weight == 0).sum()) == 32


def test_qwen2_moe_keeps_its_shared_expert_gate_and_prunes_its_shared_expert():
    pytest.importorskip("transformers")
    from helpers.moe_toys import tiny_moe, token_batches

    model = tiny_moe("qwen2_moe", num_layers=1, experts=4)
    mlp = model.model.layers[0].mlp
    targets = find_targets(model, types=None)
    assert "model.layers.0.mlp.shared_expert_gate" not in targets
    assert {f"model.layers.0.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= set(targets)
    before = copy.deepcopy({n: p.detach().clone() for n, p in mlp.named_parameters() if "gate." in n or
                            "shared_expert_gate" in n})
    result = pk.prune(model, token_batches(n=1), method="wanda", sparsity=0.5, progress=False)
    after = dict(mlp.named_parameters())
    assert before and all(torch.equal(after[n], w) for n, w in before.items())
    assert not any("shared_expert_gate" in p or ".gate.weight" in p for p in result.weights)
    assert int((mlp.shared_expert.up_proj.weight == 0).sum()) == mlp.shared_expert.up_proj.weight.numel() // 2


def _routed_by_sign() -> nn.Sequential:
    """Expert 3 wins exactly the tokens whose inputs are all negative, experts 0-2 the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(_OldMoE(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].gate.weight.copy_(torch.eye(4, 8) * 4.0 + 0.1)  # expert e < 3: input e is the largest
        model[0].gate.weight[3] = -1.0
    return model


def test_an_expert_of_the_old_layout_is_found_under_its_layer():
    model = _routed_by_sign()
    assert is_listed_expert(model, "0.experts.3") and not is_listed_expert(model, "0.gate")
    assert not is_listed_expert(nn.Sequential(nn.Module()), "0.experts.3")


def test_an_old_layout_expert_without_tokens_is_pruned_by_magnitude_and_reported():
    model = _routed_by_sign()
    data = [torch.rand(16, 8), torch.rand(16, 8)]  # positive: expert 3 is never called
    dense = model[0].experts[3].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"by magnitude: no calibration token.*'0.experts.3'"):
        result = pk.prune(model, data, method="sparsegpt", sparsity=0.5, progress=False)
    assert set(result.fallbacks) == {"0.experts.3"} and result.sparsity == 0.5
    order = dense.abs().flatten().argsort()  # oracle: the smallest half of |w| is zero
    assert bool((model[0].experts[3].weight.flatten()[order[:32]] == 0).all())
    assert bool((model[0].experts[3].weight.flatten()[order[32:]] != 0).all())
    model = _routed_by_sign()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"strict=True: no calibration token is routed to '0.experts.3'.*exclude="):
        pk.prune(model, data, method="sparsegpt", sparsity=0.5, progress=False, strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_old_layout_expert_the_first_batch_skips_is_calibrated_on_the_others():
    model = _routed_by_sign()
    data = [torch.rand(16, 8), -torch.rand(16, 8)]  # expert 3 gets the second batch alone
    result = pk.prune(model, data, method="sparsegpt", sparsity=0.5, progress=False, strict=True)
    assert not result.fallbacks and "0.experts.3" not in result.skipped
    assert [r.name for r in result.layers if r.error_selected is not None].count("0.experts.3") == 1
