"""refine="snows" for structures: the lookahead refit after the least-squares warm start, checked
against the loss recomputed on the physically smaller model; bad options and failures leave
the model exactly as it was."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk

OPTIONS = {"k": 0, "max_cg": 64, "relative_tol": True, "damping": 1e-8, "max_backtracks": 10}  # a toy: losses ~1e-6


def _tokens(n=4, seed=1, shape=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, shape, generator=g) for _ in range(n)]


def _llama(layers):
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    return tiny_llama(layers)


def _mlp_input(model, batch):
    """What the (only) MLP of a 1-layer llama reads on ``batch``."""
    seen = []
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return seen[0]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v)
                                                             for k, v in state.items())


def _one_block_losses(warm_start):
    """(the refit's reported lookahead losses, the oracle's for the warm start and the result)."""
    # One block, MLP only, K=0: the loss is the MLP output's mean squared error to the dense MLP on the
    # held-out (last) calibration batch, whose input no pruning changes: an oracle outside SNOWS.
    dense, data = _llama(1), _tokens(4, shape=(16, 48))  # a Newton step per batch: enough tokens to generalise
    start, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    pk.prune_structured(start, data, structures="mlp", ratio=0.5, refine="lstsq" if warm_start == "auto" else None,
                        progress=False)
    result = pk.prune_structured(refit, data, structures="mlp", ratio=0.5, refine="snows", progress=False,
                                 refine_options={**OPTIONS, "warm_start": warm_start})
    assert refit.model.layers[0].mlp.down_proj.in_features == 64
    x = _mlp_input(dense, data[-1])
    with torch.no_grad():
        target = dense.model.layers[0].mlp(x)
        oracle = [float(((m.model.layers[0].mlp(x) - target) ** 2).mean()) for m in (start, refit)]
    return result.reports[0].lookahead, oracle


def test_the_lookahead_loss_is_no_higher_than_the_least_squares_warm_start():
    (before, after), oracle = _one_block_losses("auto")
    assert before == pytest.approx(oracle[0], rel=1e-4) and after == pytest.approx(oracle[1], rel=1e-4)
    assert after <= before


def test_from_the_dropped_columns_the_refit_cuts_the_loss():
    (before, after), oracle = _one_block_losses("none")
    assert before == pytest.approx(oracle[0], rel=1e-4) and after == pytest.approx(oracle[1], rel=1e-4)
    assert after < 0.8 * before


def test_mlp_and_heads_shrink_and_the_smaller_model_runs_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = _llama(2)
    m = copy.deepcopy(dense)
    result = pk.prune_structured(m, _tokens(), structures="mlp,heads", ratio=0.5, refine="snows",
                                 refine_options={"k": 2, "max_cg": 5}, progress=False)
    assert all(r.lookahead is not None and r.lookahead[1] <= r.lookahead[0] for r in result.reports)
    layer = m.model.layers[1]
    assert layer.mlp.down_proj.in_features == 64 and layer.self_attn.o_proj.in_features == 32
    assert result.params_after == sum(p.numel() for p in m.parameters()) < result.params_before
    assert all(not p.requires_grad or p.grad is None for p in m.parameters())
    x = _tokens(1, seed=9)[0]
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(back(x).logits, m(x).logits)
    assert m.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_gpt2_conv1d_consumers_are_refit_in_their_own_layout():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100)).eval()
    result = pk.prune_structured(gpt2, _tokens(), ratio=0.25, refine="snows", refine_options=OPTIONS, progress=False)
    assert gpt2.transformer.h[0].mlp.c_proj.weight.shape == (96, 32)
    assert all(r.lookahead[1] <= r.lookahead[0] for r in result.reports)
    assert gpt2(_tokens(1)[0]).logits.shape == (2, 24, 100)


@pytest.mark.parametrize("kwargs, match", [
    (dict(refine="snows", refine_options={"k": -1}), "k must be a non-negative integer"),
    (dict(refine="snows", refine_options={"max_gc": 3}), "unknown snows option 'max_gc'; did you mean 'max_cg'"),
    (dict(refine="snows", refine_options={"hessian_fraction": 2.0}), "hessian_fraction must be"),
    (dict(refine="lstsq", refine_options={"k": 2}), "pass refine='snows'"),
])
def test_bad_options_are_refused_and_the_model_is_unchanged(kwargs, match):
    m = _llama(1)
    before = _state(m)
    with pytest.raises(ValueError, match=match):
        pk.prune_structured(m, _tokens(), ratio=0.5, progress=False, **kwargs)
    assert _same(m, before)


def test_a_failure_inside_the_refit_restores_the_model_exactly(monkeypatch):
    from prunekit.structures import snows

    m = _llama(2)
    before, config = _state(m), m.config.to_dict()
    calls, real = [], snows.snows_refit

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(snows, "snows_refit", fail_third)
    with pytest.raises(KeyboardInterrupt):
        pk.prune_structured(m, _tokens(), structures="mlp,heads", ratio=0.5, refine="snows",
                            refine_options=OPTIONS, progress=False)
    assert _same(m, before) and m.config.to_dict() == config
    assert all(p.requires_grad for p in m.parameters())
