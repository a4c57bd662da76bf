"""StructuredConfig: one list of options, its defaults, its checks, and prune_structured(config=...)."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.config import StructuredConfig


def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2,
                                 enable_nested_tensor=False).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, 16, generator=g) for _ in range(3)]


def test_defaults_and_help():
    c = StructuredConfig()
    assert (c.structures, c.ratio, c.params, c.method, c.refine, c.bias, c.target, c.damp, c.multiple_of) == (
        ("mlp",), None, None, "wanda", "lstsq", "auto", "pruned", 0.1, 1)
    assert pk.StructuredConfig is StructuredConfig
    assert all(f.metadata.get("help") for f in dataclasses.fields(StructuredConfig)), "every option says what it does"
    assert "``multiple_of`` (1)" in StructuredConfig.__doc__


def test_spellings_of_one_config_are_equal():
    assert StructuredConfig(structures="mlp, heads") == StructuredConfig(structures=["mlp", "heads"])
    assert StructuredConfig(structures="heads").structures == ("heads",)
    assert StructuredConfig(refine="none").refine is None  # the command line's spelling


@pytest.mark.parametrize("options,error,match", [
    ({}, ValueError, "^give exactly one of ratio"),
    ({"ratio": 0.2, "params": 0.2}, ValueError, "^give exactly one of ratio"),
    ({"ratio": 1.0}, ValueError, r"^ratio must be a number in \(0, 1\)"),
    ({"params": "0.2"}, ValueError, r"^params must be a number in \(0, 1\), got '0.2'"),
    ({"ratio": True}, ValueError, "^ratio must be a number"),
    ({"ratio": 0.2, "structures": "convs"}, ValueError, "^structures must be drawn from 'mlp', 'heads'"),
    ({"ratio": 0.2, "structures": ""}, ValueError, "^structures must be drawn"),
    ({"ratio": 0.2, "method": "wandda"}, ValueError, "^method must be one of .* for structures.*did you mean 'wanda'"),
    ({"ratio": 0.2, "refine": "obs"}, ValueError, "^refine must be one of None, 'bias', 'lstsq', 'snows' for structures"),
    ({"ratio": 0.2, "bias": "yes"}, ValueError, "^bias must be 'auto', True or False"),
    ({"ratio": 0.2, "bias": 1}, ValueError, "^bias must be 'auto', True or False"),
    ({"ratio": 0.2, "target": "dens"}, ValueError, "^target must be one of .*did you mean 'dense'"),
    ({"ratio": 0.2, "damp": -1}, ValueError, "^damp must be a number >= 0"),
    ({"ratio": 0.2, "multiple_of": 0}, ValueError, "^multiple_of must be an integer >= 1, got 0"),
    ({"ratio": 0.2, "multiple_of": 2.0}, ValueError, "^multiple_of must be an integer"),
    ({"ratio": 0.2, "max_batches": 0}, ValueError, "^max_batches must be an integer >= 1, got 0"),
    ({"ratio": 0.2, "blocks": "layers.0"}, TypeError, "^blocks must be a list of module names"),
    ({"ratio": 0.2, "progress": "auto"}, TypeError, "^progress must be True, False or None"),
])
def test_every_bad_value_names_its_option(options, error, match):
    with pytest.raises(error, match=match) as plain:
        StructuredConfig(**options).validate()
    with pytest.raises(error) as in_recipe:  # a recipe's section names itself
        StructuredConfig(**options).validate("structured.")
    assert "structured." in str(in_recipe.value)
    assert str(in_recipe.value).replace("structured.", "") == str(plain.value)


@pytest.mark.parametrize("options", [{"ratio": 0.5, "method": "taylor"}, {"ratio": 0.5, "multiple_of": 0},
                                     {"ratio": 0.5, "refine": "obs"}])
def test_a_bad_option_leaves_the_model_exactly_as_it_was(options):
    model = _encoder()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        pk.prune_structured(model, _data(), **options)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_an_unknown_keyword_names_the_closest_option():
    with pytest.raises(TypeError, match="unknown structured pruning option 'raito'; did you mean 'ratio'"):
        pk.prune_structured(_encoder(), _data(), raito=0.5)
    with pytest.raises(TypeError, match="config must be a prunekit.StructuredConfig"):
        pk.prune_structured(_encoder(), _data(), pk.PruneConfig(sparsity=0.5))


def test_a_config_and_keywords_give_the_same_model():
    """prune_structured(config) == prune_structured(**fields) == config with keywords changing it."""
    config = StructuredConfig(ratio=0.5, method="flap", damp=0.5, progress=False)
    a, b, c = _encoder(), _encoder(), _encoder()
    pk.prune_structured(a, _data(), config)
    pk.prune_structured(b, _data(), ratio=0.5, method="flap", damp=0.5, progress=False)
    pk.prune_structured(c, _data(), StructuredConfig(ratio=0.25, method="wanda", progress=False), ratio=0.5,
                        method="flap", damp=0.5)
    assert a.layers[0].linear1.out_features == 12
    for other in (b, c):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), other.state_dict().values()))
    assert config.ratio == 0.5 and config.method == "flap"  # the caller's config is not changed

