"""Encoder-decoders (T5, Whisper; random weights from configs, no download) in one-shot
``prune()``: both stacks calibrated in order, the decoder (cross-attention included) on the
pruned encoder's outputs."""
import copy
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.encdec_toys import encdec_batches, tiny_t5, tiny_whisper  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.oneshot import pipeline  # noqa: E402

MODELS = {"t5": tiny_t5, "whisper": tiny_whisper}
CROSS = {"t5": "EncDecAttention", "whisper": "encoder_attn"}
HEAD = {"t5": "lm_head", "whisper": "proj_out"}


def _encoder_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("decoder_")}


def _zero_fraction_on_tensors(model, head: str) -> float:
    """The oracle of ``result.sparsity``: zeros over every Linear and Conv1d weight but the head."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) and name != head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_every_linear_of_both_stacks_at_the_asked_sparsity(name, method):
    model = MODELS[name]()
    batches = encdec_batches(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer may be left dense with a warning
        result = pk.prune(model, batches, sparsity=0.5, method=method, progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != HEAD[name]}
    cross = [n for n in linears if CROSS[name] in n]
    assert len(cross) == 8  # q, k, v, o of 2 decoder blocks
    assert any(n.startswith(("encoder.", "model.encoder.")) for n in linears)
    for n, m in linears.items():
        assert float((m.weight == 0).float().mean()) == 0.5, n
    assert {r.name for r in result.layers} >= set(linears)
    assert result.sparsity == pytest.approx(_zero_fraction_on_tensors(model, HEAD[name]), abs=1e-12)
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    enc = _encoder_inputs(batches[0])
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 4 and torch.isfinite(model(**batches[0]).logits).all()


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_the_decoder_is_calibrated_on_the_pruned_encoders_outputs(name, monkeypatch):
    """The encoder states the decoder's first block is captured with equal an oracle: the
    model's own encoder, run after pruning (Whisper's convolutions included), and not the
    dense encoder's."""
    model = MODELS[name]()
    dense = copy.deepcopy(model)
    batches = encdec_batches(model)
    first_decoder = model.get_decoder().block[0] if name == "t5" else model.get_decoder().layers[0]
    seen = {}
    real = pipeline.capture_inputs

    def spy(model_, block, calls, **kw):
        captured = real(model_, block, calls, **kw)
        if block is first_decoder:
            seen["calls"] = [(tuple(a), dict(k)) for a, k in captured]
        return captured

    monkeypatch.setattr(pipeline, "capture_inputs", spy)
    pk.prune(model, batches, sparsity=0.5, method="sparsegpt", progress=False)
    signature = inspect.signature(first_decoder.forward)
    with torch.no_grad():
        for (args, kwargs), batch in zip(seen["calls"], batches):
            states = signature.bind(*args, **kwargs).arguments["encoder_hidden_states"]
            pruned = model.get_encoder()(**_encoder_inputs(batch)).last_hidden_state
            torch.testing.assert_close(states, pruned, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(states, dense.get_encoder()(**_encoder_inputs(batch)).last_hidden_state,
                                      atol=1e-3)


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_chain_across_both_stacks_equals_rerun(name):
    """blocks= across both stacks (not one chain: the decoder's first block, and T5's second
    blocks, which get the position bias the first computed) with capture='chain' gives the
    weights capture='rerun' gives."""
    chained = MODELS[name]()
    rerun = copy.deepcopy(chained)
    batches = encdec_batches(chained)
    stacks = ("encoder.block", "decoder.block") if name == "t5" else ("model.encoder.layers", "model.decoder.layers")
    blocks = [f"{s}.{i}" for s in stacks for i in range(2)]
    pk.prune(chained, batches, sparsity=0.5, method="sparsegpt", blocks=blocks, capture="chain", progress=False)
    pk.prune(rerun, batches, sparsity=0.5, method="sparsegpt", blocks=blocks, capture="rerun", progress=False)
    expected = rerun.state_dict()
    for key, value in chained.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_blocks_out_of_order_refused_before_any_change():
    model = tiny_t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"list 'decoder\.block\.0' before 'encoder\.block\.0'.*"
                                         r"blocks= in the order the forward calls them"):
        pk.prune(model, encdec_batches(model), sparsity=0.5, method="wanda",
                 blocks=["decoder.block.0", "encoder.block.0"], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batches_without_decoder_inputs_named_before_any_change():
    model = tiny_t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_encoder_inputs(b) for b in encdec_batches(model)]
    with pytest.raises(ValueError, match=r"first calibration batch.*decoder_input_ids"):
        pk.prune(model, batches, sparsity=0.5, method="wanda", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow  # 1.4-4.3 s on the shared 2-core machine
def test_snows_on_whisper_refits_the_convolutions_before_the_encoder():
    """A lookahead refine on layers outside every block (Whisper's convolutions, pruned first
    in a whole-model pass fed keyword-only batches)."""
    model = tiny_whisper()
    result = pk.prune(model, encdec_batches(model), sparsity=0.5, method="sparsegpt", refine="snows",
                      refine_options={"k": 2, "max_cg": 3, "epochs": 1}, progress=False)
    conv = model.model.encoder.conv1.weight
    assert float((conv == 0).float().mean()) == 0.5
    assert [r.name for r in result.layers][:2] == ["model.encoder.conv1", "model.encoder.conv2"]
    assert result.sparsity == pytest.approx(_zero_fraction_on_tensors(model, HEAD["whisper"]), abs=1e-12)
