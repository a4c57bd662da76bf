"""The FLOPs model against torch's FlopCounterMode on an eager-attention Llama, and a unit's
parameters against the parameters a pruning actually removes."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prunekit.structures.costs import attention_length, layer_flops, layer_params, unit_flops, unit_params
from prunekit.structures.find import find_structures


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    m = tiny_llama(2)
    m.config._attn_implementation = "eager"  # matmuls FlopCounterMode sees (sdpa's CPU kernel it does not)
    return m


def _measured(model, x):
    """FLOPs per token of the decoder layers, counted by torch."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    total = sum(sum(v.values()) for k, v in counts.items() if k.count(".") == 3 and ".layers." in k)
    return total / x.numel()


def test_layer_and_unit_flops_match_torchs_count(llama):
    x = torch.randint(0, 100, (2, 24))
    found = find_structures(llama, ("mlp", "heads"))
    assert attention_length(llama, found, [((x,), {})]) == 24
    assert layer_flops(llama, found, 24) == _measured(llama, x)
    smaller = copy.deepcopy(llama)
    import prunekit as pk

    pk.prune_structured(smaller, None, structures="mlp,heads", ratio=0.5, method="magnitude", refine=None)
    removed = sum(unit_flops(llama, s, 24) * s.units // 2 for s in found)
    assert _measured(llama, x) - _measured(smaller, x) == removed


def test_unit_params_are_what_a_unit_takes_with_it(llama):
    found = find_structures(llama, ("mlp", "heads"))
    smaller = copy.deepcopy(llama)
    import prunekit as pk

    pk.prune_structured(smaller, None, structures="mlp,heads", ratio=0.5, method="magnitude", refine=None)
    removed = sum(unit_params(llama, s) * s.units // 2 for s in found)
    assert layer_params(llama, found) - layer_params(smaller, find_structures(smaller, ("mlp", "heads"))) == removed


def test_flops_without_calibration_are_refused_when_attention_needs_a_length(llama):
    with pytest.raises(ValueError, match="calibration"):
        attention_length(llama, find_structures(llama), [])


@pytest.mark.parametrize("batch_first", [True, False])
def test_nn_multihead_attention_length_is_read_from_its_query(batch_first):
    """nn.MultiheadAttention uses out_proj's weights without calling it: the length comes from
    the query (sequence first unless batch_first), and flops= prunes such a model."""
    import prunekit as pk

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=batch_first, dropout=0.0)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    found = find_structures(model, ("mlp", "heads"))
    assert attention_length(model, found, [((x,), {})]) == 7
    result = pk.prune_structured(model, [x], structures="mlp,heads", flops=0.3, progress=False)
    assert result.params_after < result.params_before
    assert model(x).shape == x.shape
