"""Fused 3-D experts (prunekit.layers.experts): Mixtral and Qwen2-MoE from transformers 5 configs
prune to the asked sparsity, each expert on the tokens routed to it."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit as pk
from prunekit.layers.base import kind_of
from prunekit.layers.experts import FusedExperts, FusedExpertsKind
from prunekit.oneshot.blocks import capture_inputs, find_blocks
from prunekit.oneshot.stats import gather_stats
from prunekit.training.entries import unit_modules

transformers = pytest.importorskip("transformers")
from helpers.moe_toys import never_routed, tiny_moe, token_batches  # noqa: E402

EXPERTS = "model.layers.0.mlp.experts"


def _small(kind: str, **extra):
    return tiny_moe(kind, num_layers=1, experts=4, **extra)


def _zeros(model: nn.Module, names) -> float:
    params = dict(model.named_parameters())
    return sum(int((params[n] == 0).sum()) for n in names) / sum(params[n].numel() for n in names)


def test_fused_experts_are_matched_by_layout():
    model = _small("mixtral")
    experts = model.get_submodule(EXPERTS)
    assert isinstance(experts, FusedExperts) and isinstance(kind_of(experts), FusedExpertsKind)
    assert issubclass(type(experts), FusedExperts) and not issubclass(nn.Linear, FusedExperts)
    assert not isinstance(nn.Linear(2, 2), FusedExperts)
    kind = kind_of(experts)
    assert kind.stages(experts) == (tuple(f"gate_up_proj[{e}]" for e in range(4)),
                                    tuple(f"down_proj[{e}]" for e in range(4)))
    assert torch.equal(kind.matrix(experts, "down_proj[2]"), experts.down_proj[2])
    assert kind.shape(experts, "gate_up_proj[1]") == (64, 32)
    transposed = copy.deepcopy(experts)
    transposed.is_transposed = True  # transformers' flag for [E, H, 2I]: not this layout, stays a gap
    assert not isinstance(transposed, FusedExperts)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_every_method_and_pattern_prunes_the_experts_to_the_asked_sparsity(kind, method, pattern):
    model = _small(kind)
    asked = dict(sparsity=0.5) if pattern == "50%" else dict(pattern="2:4")
    data = token_batches(n=2) if method != "magnitude" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense, nothing pruned by magnitude instead
        result = pk.prune(model, data, method=method, progress=False, **asked)
    expected = [n for n in result.weights]
    assert f"{EXPERTS}.gate_up_proj" in expected and f"{EXPERTS}.down_proj" in expected
    assert not any("gate.weight" in n or "shared_expert_gate" in n for n in expected)
    assert result.sparsity == _zeros(model, expected) == 0.5  # counted on the tensors, no gaps
    experts = model.get_submodule(EXPERTS)
    for param in (experts.gate_up_proj, experts.down_proj):
        for e in range(4):
            assert int((param[e] == 0).sum()) == param[e].numel() // 2
            if pattern == "2:4":
                groups = param[e].reshape(param.shape[1], -1, 4)
                assert int((groups != 0).sum(-1).max()) == 2


@torch.no_grad()
def test_each_experts_statistics_are_its_routed_tokens_weighted_by_the_router():
    """Oracle: the MoE block's input by a hook, the router's top-k by hand, each expert's Gram."""
    model = _small("mixtral")
    data = token_batches(n=2)
    layer = model.model.layers[0]
    seen = []
    handle = layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 32)))
    for ids in data:
        model(ids)
    handle.remove()
    x = torch.cat(seen).double()
    probs = torch.softmax(x @ layer.mlp.gate.weight.double().T, dim=-1)
    top, index = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0][1], [((ids,), {}) for ids in data])
    stats = gather_stats(blocks[0][1], inputs, {"mlp.experts": layer.mlp.experts}, dtype=torch.float64)
    weights = layer.mlp.experts.gate_up_proj.double()
    for e in range(4):
        routed = (index == e).any(-1)
        g = (top * (index == e)).sum(-1)[routed, None]
        xe = x[routed]
        gate, up = (xe @ weights[e].T).chunk(2, dim=-1)
        act = F.silu(gate) * up
        for unit, rows in ((f"gate_up_proj[{e}]", xe), (f"down_proj[{e}]", act)):
            s = stats[f"mlp.experts.{unit}"]
            assert s.count == int(routed.sum()) > 0
            oracle = (g * rows).T @ (g * rows)
            torch.testing.assert_close(s.h_sum, oracle, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(s.sq, (oracle.diagonal()), rtol=1e-4, atol=1e-5)


def test_a_refit_against_the_dense_target_pairs_the_same_tokens():
    model = _small("qwen2_moe")
    result = pk.prune(model, token_batches(n=2), method="wanda", refine="lstsq", sparsity=0.5, progress=False)
    assert result.sparsity == 0.5 and not result.fallbacks
    refits = [r for r in result.layers if ".experts." in r.name]
    assert len(refits) == 8 and all(r.error_refined <= r.error_selected * (1 + 1e-6) for r in refits)


@pytest.mark.slow  # ~1 s alone, ~4 s on a loaded 2-core machine
def test_snows_refits_each_expert_on_its_lookahead_loss():
    # relative_tol: these random experts' losses are ~1e-7, below SNOWS's absolute CG tolerance
    model = tiny_moe("mixtral", num_layers=2, experts=4)
    result = pk.prune(model, token_batches(n=3), method="wanda", refine="snows", sparsity=0.5, progress=False,
                      include=r"layers\.0\.mlp", refine_options={"relative_tol": True})
    assert result.sparsity == 0.5 and not result.fallbacks
    losses = [(r.lookahead_before, r.lookahead_after) for r in result.layers]
    assert len(losses) == 8 and all(after <= before for before, after in losses)
    assert any(after < before for before, after in losses)


def test_an_expert_without_tokens_is_pruned_by_magnitude_and_reported():
    model = _small("mixtral")
    never_routed(model, expert=3)
    dense = model.get_submodule(EXPERTS).gate_up_proj[3].detach().clone()
    with pytest.warns(UserWarning, match=r"by magnitude: no calibration token.*experts.gate_up_proj\[3\]"):
        result = pk.prune(model, token_batches(n=2), method="wanda", sparsity=0.5, progress=False)
    assert set(result.fallbacks) == {f"{EXPERTS}.gate_up_proj[3]", f"{EXPERTS}.down_proj[3]"}
    assert "by magnitude" in result.summary()
    written = model.get_submodule(EXPERTS).gate_up_proj[3]
    order = dense.abs().flatten().argsort(stable=True)  # oracle: the smallest half of |w| is zero
    half = dense.numel() // 2
    assert bool((written.flatten()[order[:half]] == 0).all()) and bool((written.flatten()[order[half:]] != 0).all())
    assert result.sparsity == _zeros(model, result.weights) >= 0.5  # never_routed() wrote zeros of its own


def test_strict_refuses_an_expert_without_tokens_before_anything_changes():
    model = _small("mixtral")
    never_routed(model, expert=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"strict=True: no calibration token is routed to "
                                         r"'model.layers.0.mlp.experts.gate_up_proj\[1\]'.*exclude="):
        pk.prune(model, token_batches(n=2), method="wanda", sparsity=0.5, strict=True, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_experts_that_cannot_hold_the_pattern_are_refused_naming_them():
    model = tiny_moe("mixtral", num_layers=1, experts=4, intermediate_size=30)  # down_proj reads 30 columns
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"layer '{EXPERTS}' cannot be pruned with pattern 2:4: input dimension 30"):
        pk.prune(model, token_batches(n=1), method="wanda", pattern="2:4", strict=True, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_the_zeros_survive_save_pretrained(tmp_path, kind):
    model = _small(kind)
    pk.prune(model, token_batches(n=2), method="sparsegpt", sparsity=0.5, progress=False)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    for name, param in model.get_submodule(EXPERTS).named_parameters():
        reloaded = loaded.get_submodule(EXPERTS).get_parameter(name)
        assert torch.equal(reloaded, param) and int((reloaded == 0).sum()) == param.numel() // 2
    ids = token_batches(n=1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_types_can_name_the_experts_alone():
    model = _small("mixtral")
    result = pk.prune(model, token_batches(n=1), method="wanda", sparsity=0.5, types=[FusedExperts],
                      progress=False)
    assert {r.name.rpartition(".")[0] for r in result.layers} == {EXPERTS}
    assert int((model.model.layers[0].self_attn.q_proj.weight == 0).sum()) == 0


def test_a_training_pruner_sees_the_expert_units():
    model = _small("mixtral")
    pruner = pk.MagnitudePruner(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5)
    units = unit_modules(pruner.entries)
    assert units[f"{EXPERTS}.down_proj[2]"] == (EXPERTS, "down_proj[2]")
    assert not any(n.endswith(".gate") for n, _ in units.values())
    experts = model.get_submodule(EXPERTS)
    for e in range(4):
        assert int((experts.gate_up_proj[e] == 0).sum()) == experts.gate_up_proj[e].numel() // 2
    assert int((model.model.layers[0].mlp.gate.weight == 0).sum()) == 0


class _ToyExperts(nn.Module):
    """A hand-written module with transformers' fused layout and call, no transformers inside."""

    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 4) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner))
        self.act_fn = nn.GELU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            tokens, slot = torch.where(top_k_index == e)
            gate, up = F.linear(hidden_states[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, tokens, y * top_k_weights[tokens, slot, None])
        return out


class _ToyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 3, bias=False)
        self.experts = _ToyExperts()

    def forward(self, x):
        weights, index = torch.softmax(self.router(x), -1).topk(2, dim=-1)
        return x + self.experts(hidden_states=x, top_k_index=index, top_k_weights=weights)


def test_any_module_with_the_layout_and_call_is_a_fused_experts_layer():
    torch.manual_seed(0)
    model = nn.Sequential(_ToyMoE(), _ToyMoE(), nn.Linear(8, 2))
    assert isinstance(model[0].experts, FusedExperts)
    router = model[0].router.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pk.prune(model, [torch.randn(32, 8) for _ in range(2)], method="sparsegpt", pattern="2:4",
                          progress=False)
    assert result.sparsity == 0.5 and set(result.weights) == {f"{i}.experts.{p}" for i in (0, 1)
                                                              for p in ("gate_up_proj", "down_proj")}
    assert torch.equal(model[0].router.weight, router)
