"""prune_experts / score_experts end to end on transformers MoE models built from configs."""
import pytest
import torch

import prunekit as pk
from helpers.llama_toys import tiny_llama
from helpers.moe_toys import never_routed, tiny_moe, token_batches
from prunekit.structures import expert_pruning as module
from prunekit.structures.expert_pruning import lowest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def assert_unchanged(model, snap):
    state, config = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert model.config.to_dict() == config
    for mlp in (layer.mlp for layer in model.model.layers):
        assert mlp.experts.num_experts == mlp.gate.num_experts == mlp.gate.weight.shape[0]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["frequency", "weight", "reap"])
def test_an_expert_never_routed_goes_and_the_output_stays(kind, method):
    """Oracle: expert 5 can never win a routing decision, so removing it changes nothing (Qwen2-MoE
    does not renormalise its top-k weights: its softmax probability is exactly 0 in float32)."""
    model = tiny_moe(kind, experts=6, top_k=2)
    never_routed(model, expert=5)
    calib = token_batches(3)
    x = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(x).logits
    result = pk.prune_experts(model, calib, count=1, method=method)
    assert [r.removed for r in result.reports] == [[5], [5]]
    assert all(r.routed_removed == 0 for r in result.reports)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_removing_a_routed_expert_does_change_the_output():
    """The oracle above can fail: the same model loses a used expert and its output moves."""
    model = tiny_moe("mixtral", experts=6, top_k=2)
    never_routed(model, expert=5)
    x = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(x).logits
    undo = module.Undo()
    for site in pk.find_experts(model):
        module.remove_experts(model, site, [1, 2, 3, 4, 5], undo)
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max() > 1e-3


def test_removes_the_lowest_scores_of_each_layer_in_order():
    model = tiny_moe("mixtral", experts=8, top_k=2)
    calib = token_batches(3)
    dense_scores = pk.score_experts(model, calib)
    result = pk.prune_experts(model, calib, ratio=0.25, method="weight")
    first = result.reports[0]
    # the first layer sees the dense model's inputs, so its choice is the dense scores' lowest
    assert first.removed == lowest(dense_scores["model.layers.0.mlp"].score("weight"), 2)
    torch.testing.assert_close(result.scores["model.layers.0.mlp"].score("reap"),
                               dense_scores["model.layers.0.mlp"].score("reap"))
    assert result.config == {"num_local_experts": 6} and model.config.num_local_experts == 6
    assert all(r.experts_after == 6 for r in result.reports)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 6
    assert result.params_after < result.params_before
    assert "8->6" in result.summary()


def test_lowest_breaks_ties_towards_the_lower_index():
    assert lowest(torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0]), 2) == [1, 2]
    assert lowest(torch.tensor([0.0, 0.0, 0.0]), 0) == []


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_save_and_plain_reload_give_the_same_logits_and_generation(kind, tmp_path):
    import transformers

    model = tiny_moe(kind, experts=6, top_k=2)
    pk.prune_experts(model, token_batches(2), count=2)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    key = "num_local_experts" if kind == "mixtral" else "num_experts"
    assert getattr(loaded.config, key) == 4
    x = token_batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    prompt = x[:1, :5]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), out)
    if kind == "qwen2_moe":
        assert loaded.model.layers[0].mlp.shared_expert.down_proj.weight.shape == (32, 48)


@pytest.mark.parametrize("kwargs,match", [
    ({"count": 5}, "model.layers.0.mlp: count=5 removes 5 of 6 experts, leaving 1, fewer than the 2 .* at most 4"),
    ({"ratio": 0.9}, "model.layers.0.mlp: ratio=0.9 removes 5 of 6 .* at most 4 can go"),
    ({"count": 6}, "leaving 0"),
    ({"ratio": 1.0}, "ratio must be a number in \\(0, 1\\)"),
    ({"count": -1}, "count must be an integer >= 0"),
    ({"ratio": 0.5, "count": 1}, "exactly one of ratio= .* or count="),
    ({}, "exactly one of ratio="),
    ({"count": 1, "method": "wanda"}, "method must be one of reap, weight, frequency"),
])
def test_bad_arguments_are_refused_and_the_model_is_unchanged(kwargs, match):
    model = tiny_moe("mixtral", experts=6, top_k=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pk.prune_experts(model, token_batches(1), **kwargs)
    assert_unchanged(model, snap)


def test_no_calibration_or_no_experts_is_refused():
    model = tiny_moe("mixtral", experts=6, top_k=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="calibration is required"):
        pk.prune_experts(model, None, count=1)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="no recognised mixture-of-experts layer"):
        pk.prune_experts(tiny_llama(), token_batches(1), count=1)
    with pytest.raises(ValueError, match="pk.prune_experts"):
        pk.prune_structured(model, token_batches(1), structures="experts", ratio=0.25)


def test_a_failure_midway_puts_everything_back(monkeypatch):
    model = tiny_moe("qwen2_moe", experts=6, top_k=2)
    snap = snapshot(model)
    real, calls = module.remove_experts, []

    def fails_on_second_layer(*args):
        calls.append(args[1].owner)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(module, "remove_experts", fails_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        pk.prune_experts(model, token_batches(2), count=2)
    assert calls == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert_unchanged(model, snap)
    assert model.training is False
