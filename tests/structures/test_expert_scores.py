"""Expert usage scores from calibration routing (prunekit.structures.expert_scores), against a
brute-force count over tokens."""
import pytest
import torch
import torch.nn.functional as F

from helpers.moe_toys import tiny_moe, token_batches
from prunekit.structures.expert_scores import ExpertRecorder, ExpertScores

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def brute_force(mlp, xs: list[torch.Tensor], normalise: bool) -> dict[str, torch.Tensor]:
    """Token by token: the router's top-k by hand, each chosen expert's SwiGLU output from its
    weights, in float64."""
    experts, E = mlp.experts, mlp.experts.num_experts
    chosen, weight, reap, tokens = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64), \
        torch.zeros(E, dtype=torch.float64), 0
    inter = experts.down_proj.shape[2]
    for x in xs:
        for t in x.reshape(-1, x.shape[-1]):
            tokens += 1
            probs = torch.softmax(F.linear(t, mlp.gate.weight).float(), dim=-1)
            top_v, top_i = torch.topk(probs, mlp.gate.top_k)
            if normalise:
                top_v = top_v / top_v.sum()
            for v, e in zip(top_v.tolist(), top_i.tolist()):
                gu = experts.gate_up_proj[e].double() @ t.double()
                out = experts.down_proj[e].double() @ (F.silu(gu[:inter]) * gu[inter:])
                chosen[e] += 1
                weight[e] += v
                reap[e] += v * out.norm()
    return {"frequency": chosen / tokens, "weight": weight / tokens, "reap": reap / tokens}


@pytest.mark.parametrize("kind,normalise", [("mixtral", True), ("qwen2_moe", False)])
def test_scores_match_a_brute_force_count(kind, normalise):
    model = tiny_moe(kind, experts=6, top_k=2)
    mlp = model.model.layers[1].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    scores = ExpertScores(6)
    rec = ExpertRecorder(mlp.experts, scores)
    with torch.no_grad():
        for x in token_batches(3, batch=2, seq=8):
            model(x)
    rec.close()
    handle.remove()
    assert scores.tokens == 3 * 2 * 8
    expected = brute_force(mlp, seen, normalise)
    torch.testing.assert_close(scores.score("frequency"), expected["frequency"], rtol=0, atol=0)
    assert float(scores.score("frequency").sum()) == pytest.approx(2.0)
    torch.testing.assert_close(scores.score("weight"), expected["weight"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.score("reap"), expected["reap"], rtol=1e-4, atol=1e-8)


def test_recorder_counts_nothing_once_closed_and_leaves_the_output_alone():
    model = tiny_moe("mixtral")
    x = token_batches(1)[0]
    with torch.no_grad():
        ref = model(x).logits
        scores = ExpertScores(8)
        rec = ExpertRecorder(model.model.layers[0].mlp.experts, scores)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
        rec.close()
        model(x)
    assert scores.tokens == x.numel()


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="method must be one of reap, weight, frequency"):
        ExpertScores(4).score("wanda")


def test_experts_called_another_way_is_refused():
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    rec = ExpertRecorder(experts, ExpertScores(8))
    with pytest.raises(TypeError, match="experts\\(hidden_states, top_k_index, top_k_weights\\)"):
        experts(torch.randn(3, 32))
    rec.close()
