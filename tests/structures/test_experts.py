"""Finding mixture-of-experts layers and removing whole experts (prunekit.structures.experts)."""
import pytest
import torch

from helpers.llama_toys import tiny_llama
from helpers.moe_toys import tiny_moe, token_batches
from prunekit.structures.experts import ExpertSite, find_experts, remove_experts
from prunekit.structures.surgery import Undo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_finds_every_moe_layer_of_transformers_models(kind):
    model = tiny_moe(kind, experts=6, top_k=3)
    sites = find_experts(model)
    assert sites == [ExpertSite(f"model.layers.{i}.mlp", f"model.layers.{i}.mlp.gate", f"model.layers.{i}.mlp.experts",
                                6, 3) for i in range(2)]


def test_dense_model_has_no_experts():
    assert find_experts(tiny_llama()) == []


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_removal_equals_a_model_built_with_fewer_experts(kind):
    """Oracle: a model built from a config with 5 experts, given the kept experts' weights and
    router rows, computes what the pruned model computes."""
    model = tiny_moe(kind, experts=8, top_k=2)
    keep = [0, 2, 3, 6, 7]
    expected = tiny_moe(kind, experts=5, top_k=2)
    state = model.state_dict()
    small = {k: (v[keep] if (".gate.weight" in k or ".experts." in k) else v) for k, v in state.items()}
    expected.load_state_dict(small)
    undo = Undo()
    for site in find_experts(model):
        remove_experts(model, site, keep, undo)
    x = token_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected(x).logits, rtol=1e-5, atol=1e-5)
    mlp = model.model.layers[0].mlp
    assert mlp.experts.num_experts == mlp.gate.num_experts == 5
    if kind == "qwen2_moe":  # the shared expert is another child: untouched
        assert mlp.shared_expert.down_proj.weight is model.get_submodule("model.layers.0.mlp.shared_expert.down_proj").weight
        assert torch.equal(mlp.shared_expert.down_proj.weight, state["model.layers.0.mlp.shared_expert.down_proj.weight"])


def test_undo_puts_back_the_very_tensors_and_counts():
    model = tiny_moe("mixtral")
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    undo = Undo()
    remove_experts(model, find_experts(model)[0], [1, 4, 5], undo)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3
    undo.restore()
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is v for k, v in before.items())
    assert model.model.layers[0].mlp.experts.num_experts == model.model.layers[0].mlp.gate.num_experts == 8


def test_keeping_fewer_than_top_k_is_refused():
    model = tiny_moe("mixtral", top_k=2)
    with pytest.raises(ValueError, match="model.layers.0.mlp: keeping 1 experts is fewer than the 2"):
        remove_experts(model, find_experts(model)[0], [3], Undo())
    assert model.model.layers[0].mlp.experts.down_proj.shape[0] == 8
