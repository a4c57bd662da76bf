"""Decoder LLM layout (llama-style, randomly initialised from a config: no download)."""
import copy
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.llama_toys import tiny_llama  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.oneshot.blocks import capture_inputs, find_blocks, propagate  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(num_layers=2)
    ids = [torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, [{"input_ids": i} for i in ids]


def test_chained_decoder_inputs_equal_a_full_forward_layer_by_layer(llama):
    model, calib = llama
    calls = [((), c) for c in calib]
    blocks = find_blocks(model)
    assert [n for n, _ in blocks] == ["model.layers.0", "model.layers.1"]
    chained = capture_inputs(model, blocks[0][1], calls)
    for _, block in blocks:
        direct = capture_inputs(model, block, calls)
        for (a, ka), (b, kb) in zip(chained, direct):
            first_a = a[0] if a else ka["hidden_states"]
            first_b = b[0] if b else kb["hidden_states"]
            assert torch.allclose(first_a, first_b, atol=1e-5)
        chained = propagate(block, chained)


@pytest.mark.parametrize("method,refine,pattern", [
    ("magnitude", None, "unstructured"), ("wanda", None, "2:4"), ("sparsegpt", None, "unstructured"),
    ("sparsegpt", "lstsq", "4:8"), ("wanda", "snows", "unstructured")])
def test_every_method_prunes_the_decoder_and_leaves_the_tied_head(llama, method, refine, pattern):
    dense, calib = llama
    model = copy.deepcopy(dense)
    keys = list(model.state_dict())
    result = pk.prune(model, calib, sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                      method=method, refine=refine, refine_options={"k": 3, "max_cg": 5, "epochs": 1} if refine == "snows" else None, progress=False)
    assert len(result.layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(abs(r.sparsity - 0.5) < 1e-6 for r in result.layers)
    assert list(model.state_dict()) == keys
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.isfinite(model(**calib[0]).logits).all()


def test_captured_inputs_carry_no_growing_cache(llama):
    """Calibration batches without use_cache=False: the captured layer inputs hold no key/value
    cache, so re-running a layer on them (as every statistics pass does) gives the same output."""
    model, calib = llama
    calls = [((), c) for c in calib]
    block = find_blocks(model)[0][1]
    inputs = capture_inputs(model, block, calls)
    for _, kwargs in inputs:
        assert all(kwargs.get(k) is None for k in ("past_key_value", "past_key_values"))
    args, kwargs = inputs[0]
    first, again = block(*args, **kwargs), block(*args, **kwargs)
    first = first[0] if isinstance(first, tuple) else first
    again = again[0] if isinstance(again, tuple) else again
    assert torch.equal(first, again)
