"""prune_structured end to end: smaller modules, a standard config that reloads, the refit
repairs, and bad input leaves the model exactly as it was."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk


def _tokens(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (2, 24), generator=g) for _ in range(n)]


def _logit_mse(a, b, x):
    with torch.no_grad():
        return float(nn.functional.mse_loss(a(x).logits, b(x).logits))


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    return tiny_llama(2)


def test_llama_mlp_and_heads_shrink_reload_and_generate(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = copy.deepcopy(llama)
    result = pk.prune_structured(m, _tokens(), structures="mlp,heads", ratio=0.5, progress=False)
    layer = m.model.layers[0]
    assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features == 64
    assert layer.self_attn.q_proj.out_features == 32 and layer.self_attn.k_proj.out_features == 32
    assert layer.self_attn.num_key_value_groups == 1
    assert (m.config.intermediate_size, m.config.num_attention_heads, m.config.num_key_value_heads) == (64, 2, 2)
    assert result.params_after == sum(p.numel() for p in m.parameters()) < result.params_before
    x = _tokens(1, seed=9)[0]
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(back(x).logits, m(x).logits)
    assert back.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_least_squares_refit_beats_dropping(llama):
    x = _tokens(1, seed=7)[0]
    errs = {}
    for refit in (None, "lstsq"):
        m = copy.deepcopy(llama)
        pk.prune_structured(m, _tokens(24), structures="mlp", ratio=0.5, refine=refit, progress=False)
        errs[refit] = _logit_mse(m, llama, x)  # on tokens the calibration never saw
    assert errs["lstsq"] < 0.9 * errs[None]


@pytest.mark.parametrize("score", ["magnitude", "wanda", "flap", "obs"])
def test_every_score_reports_a_repair(llama, score):
    m = copy.deepcopy(llama)
    result = pk.prune_structured(m, _tokens(), structures="mlp", ratio=0.25, method=score, progress=False)
    assert [r.units_after for r in result.reports] == [96, 96]
    assert all(r.error_refit <= r.error_dropped * (1 + 1e-9) for r in result.reports)


def test_params_target_is_met_closely(llama):
    m = copy.deepcopy(llama)
    from prunekit.structures.budget import layer_params
    from prunekit.structures.find import find_structures

    before = layer_params(m, find_structures(m))
    pk.prune_structured(m, None, structures="mlp", params=0.2, method="magnitude", refine=None)
    after = layer_params(m, find_structures(m))
    assert abs((1 - after / before) - 0.2) < 0.01


def test_bias_fit_adds_mlp_bias_and_the_config_says_so(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = copy.deepcopy(llama)
    pk.prune_structured(m, _tokens(), structures="mlp", ratio=0.5, bias=True, progress=False)
    assert m.config.mlp_bias is True and m.model.layers[0].mlp.down_proj.bias is not None
    m.save_pretrained(tmp_path)
    x = _tokens(1, seed=3)[0]
    assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits, m(x).logits)


def test_gpt2_conv1d_bert_and_torch_encoder_shrink():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100)).eval()
    pk.prune_structured(gpt2, _tokens(), ratio=0.25, progress=False)
    assert gpt2.transformer.h[0].mlp.c_fc.weight.shape == (32, 96) and gpt2.config.n_inner == 96
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_attention_heads=4,
                                                          intermediate_size=48, num_hidden_layers=2)).eval()
    pk.prune_structured(bert, _tokens(), ratio=0.5, progress=False)
    assert bert.encoder.layer[1].output.dense.in_features == 24 and bert.config.intermediate_size == 24
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    data = [torch.randn(2, 5, 16) for _ in range(3)]
    dense = copy.deepcopy(enc)
    pk.prune_structured(enc, data, ratio=0.5, progress=False)
    assert enc.layers[0].linear1.out_features == 12
    assert enc(data[0]).shape == dense(data[0]).shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=1.0), "ratio must be a number in"),
    (dict(ratio=0.999), "leaves none"),
    (dict(ratio=0.5, params=0.2), "exactly one of ratio"),
    (dict(ratio=0.5, structures="channels"), "structures=.channels. is prunekit.prune_channels"),
    (dict(ratio=0.5, structures="convs"), "structures must be drawn"),
    (dict(ratio=0.5, method="taylor"), "method must be one of"),
    (dict(ratio=0.5, refine="obs"), "refine must be one of"),
    (dict(ratio=0.25, structures="heads"), "can lose 1/2 of its heads"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(llama, kwargs, match):
    m = copy.deepcopy(llama)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        pk.prune_structured(m, _tokens(), progress=False, **kwargs)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_a_failure_midway_restores_the_model_exactly(llama, monkeypatch):
    from prunekit.structures import prune as sp

    m = copy.deepcopy(llama)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    config = m.config.to_dict()
    calls = []
    real = sp._prune_one

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "_prune_one", fail_second)
    with pytest.raises(KeyboardInterrupt):
        pk.prune_structured(m, _tokens(), structures="mlp,heads", ratio=0.5, progress=False)
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert m.config.to_dict() == config and m.model.layers[0].self_attn.num_key_value_groups == 2


def test_a_model_without_structures_and_empty_data_are_refused():
    with pytest.raises(ValueError, match="no recognised"):
        pk.prune_structured(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], ratio=0.5)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 1, enable_nested_tensor=False)
    with pytest.raises(ValueError, match="calibration is empty"):
        pk.prune_structured(enc, [], ratio=0.5)


def test_multiple_of_rounds_the_kept_width(llama):
    m = copy.deepcopy(llama)
    pk.prune_structured(m, None, structures="mlp", ratio=0.3, method="magnitude", refine=None, multiple_of=32)
    assert m.config.intermediate_size == 96 and m.model.layers[1].mlp.down_proj.in_features == 96  # 128*0.7 -> 96
    with pytest.raises(ValueError, match="multiple_of must be"):
        pk.prune_structured(copy.deepcopy(llama), None, ratio=0.3, method="magnitude", refine=None, multiple_of=0)


def test_a_hand_written_vit_shrinks_and_the_refit_repairs_it():
    from prunekit.zoo.vit import vit_mnist

    dense = vit_mnist().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 1, 28, 28, generator=g) for _ in range(8)]
    x = torch.randn(32, 1, 28, 28, generator=g)
    errors = {}
    for refine in (None, "lstsq"):
        m = copy.deepcopy(dense)
        pk.prune_structured(m, data, ratio=0.5, refine=refine, progress=False)
        assert m[1].mlp[0].out_features == m[1].mlp[2].in_features == 64
        with torch.no_grad():
            errors[refine] = float((m(x) - dense(x)).pow(2).mean())
    assert errors["lstsq"] < 0.5 * errors[None]


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                  num_hidden_layers=2)
    return transformers.BertModel(cfg).eval(), _tokens(8), _tokens(1, seed=9)[0], lambda o: o.last_hidden_state


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100)
    return transformers.GPT2LMHeadModel(cfg).eval(), _tokens(8), _tokens(1, seed=9)[0], lambda o: o.logits


def _vit():
    from prunekit.zoo.vit import vit_mnist

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(4)]
    return vit_mnist(depth=2).eval(), data, torch.randn(4, 1, 28, 28, generator=g), lambda o: o


def _torch_encoder():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 24, batch_first=True), 2, enable_nested_tensor=False)
    g = torch.Generator().manual_seed(0)
    return enc.eval(), [torch.randn(4, 6, 16, generator=g) for _ in range(4)], torch.randn(3, 6, 16, generator=g), \
        lambda o: o


HEAD_MODELS = {"bert": _bert, "gpt2": _gpt2, "vit": _vit, "torch-encoder": _torch_encoder}


def _zero_heads(model, reports):
    """The oracle: the dense model with the removed heads' consumer columns zeroed."""
    from prunekit.structures.find import find_structures

    consumers = {s.owner: (s.consumer, s.unit_size) for s in find_structures(model, ("heads",))}
    with torch.no_grad():
        for r in reports:
            name, size = consumers[r.owner]
            cols = torch.cat([torch.arange(h * size, (h + 1) * size) for h in r.removed])
            consumer = model.get_submodule(name)
            if isinstance(consumer, nn.Linear):
                consumer.weight[:, cols] = 0
            else:  # transformers' Conv1D: weight [d_in, d_out]
                consumer.weight[cols] = 0
    return model


@pytest.mark.filterwarnings("ignore:the config cannot express fewer attention heads")
@pytest.mark.parametrize("build", HEAD_MODELS)
def test_removing_heads_equals_zeroing_them_and_the_refit_repairs(build):
    from prunekit.structures.budget import unit_params
    from prunekit.structures.find import find_structures

    dense, data, x, out = HEAD_MODELS[build]()
    per_unit = {s.owner: unit_params(dense, s) for s in find_structures(dense, ("heads",))}
    m = copy.deepcopy(dense)
    result = pk.prune_structured(m, data, structures="heads", ratio=0.5, refine=None, progress=False)
    assert [len(r.removed) for r in result.reports] == [r.units_before // 2 for r in result.reports]
    assert result.params_before - result.params_after == sum(per_unit[r.owner] * len(r.removed) for r in result.reports)
    assert m.state_dict().keys() == dense.state_dict().keys()
    oracle = _zero_heads(copy.deepcopy(dense), result.reports)
    with torch.no_grad():
        torch.testing.assert_close(out(m(x)), out(oracle(x)), rtol=1e-5, atol=1e-5)
    refit = pk.prune_structured(copy.deepcopy(dense), data, structures="heads", ratio=0.5, refine="lstsq",
                                progress=False)
    assert all(r.error_refit <= r.error_dropped * (1 + 1e-9) for r in refit.reports)
    assert all(r.error_refit < r.error_dropped for r in refit.reports)


@pytest.mark.parametrize("build", HEAD_MODELS)
def test_removing_every_head_is_refused_and_a_failure_midway_restores_the_attention(build, monkeypatch):
    from prunekit.structures import prune as sp

    dense, data, _, _ = HEAD_MODELS[build]()
    m = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="leaves none"):
        pk.prune_structured(m, data, structures="heads", ratio=0.9, progress=False)
    real, calls = sp._prune_one, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "_prune_one", fail_second)
    with pytest.raises(KeyboardInterrupt):
        pk.prune_structured(m, data, structures="heads", ratio=0.5, progress=False)
    assert [type(a) for a in m.modules()] == [type(a) for a in dense.modules()]  # nn.MultiheadAttention is back
    assert m.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in dense.state_dict().items())
    assert _ints(m) == _ints(dense)  # head counts, widths


def _ints(model):
    return {(n, k): v for n, mod in model.named_modules() for k, v in vars(mod).items() if isinstance(v, int)}


def test_bert_and_gpt2_heads_keep_the_config_and_still_generate():
    m, data, x, _ = _gpt2()
    with pytest.warns(UserWarning, match="config cannot express fewer attention heads"):
        pk.prune_structured(m, data, structures="heads", ratio=0.25, progress=False)
    attn = m.transformer.h[1].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, m.config.n_head) == (3, 24, 72, 4)
    assert m.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)  # through the KV cache
    bert, data, x, _ = _bert()
    with pytest.warns(UserWarning, match="prunekit.load_structured"):
        pk.prune_structured(bert, data, structures="mlp,heads", ratio=0.5, progress=False)
    att = bert.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size, att.attention_head_size) == (2, 16, 8)
    assert (bert.config.num_attention_heads, bert.config.intermediate_size) == (4, 24)
    assert bert(x).last_hidden_state.shape == (2, 24, 32)


def test_vit_heads_become_the_drop_in_with_the_same_keys():
    from prunekit.structures.mha import PrunedMultiheadAttention

    dense, data, x, _ = _vit()
    m = copy.deepcopy(dense)
    pk.prune_structured(m, data, structures="mlp,heads", ratio=0.25, progress=False)
    attn = m[1].attn
    assert isinstance(attn, PrunedMultiheadAttention) and (attn.num_heads, attn.head_dim, attn.embed_dim) == (3, 16, 64)
    assert attn.in_proj_weight.shape == (144, 64) and attn.out_proj.in_features == 48
    assert m.state_dict().keys() == dense.state_dict().keys()
    assert m(x).shape == (4, 10)


def test_qwen2_moe_shared_expert_width_goes_to_its_own_config_field(tmp_path):
    """Qwen2-MoE's shared expert is an MLP whose width is ``shared_expert_intermediate_size``;
    writing it into ``intermediate_size`` would make the checkpoint unloadable."""
    pytest.importorskip("transformers")
    import transformers
    from helpers.moe_toys import tiny_moe, token_batches

    model = tiny_moe("qwen2_moe").eval()
    pk.prune_structured(model, token_batches(), structures="mlp", ratio=0.25, progress=False)
    assert model.config.shared_expert_intermediate_size == 36 and model.config.intermediate_size == 64
    x = token_batches(1, seed=3)[0]
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=0, atol=0)
