"""Shapes recorded from a non-uniformly pruned plain nn.Module rebuild it from a fresh one (state
dict + shapes), every int attribute surgery sets is recorded, and a bad record changes nothing."""
import copy
import json

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structures.shapes import SHAPE_ATTRS, merge_shapes
from prunekit.structures.surgery import Undo


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)) for _ in range(3)]).eval()


def _pruned():
    model = _stack()
    data = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pk.prune_structured(model, data, ratio=0.4, budget="global", floor=0.25, bias=True, progress=False)
    return model


def test_a_fresh_model_takes_the_recorded_shapes_and_the_weights():
    model = _pruned()
    widths = [block[2].in_features for block in model]
    assert len(set(widths)) > 1
    shapes = json.loads(json.dumps(pk.structure_shapes(model)))  # plain JSON data
    fresh = pk.apply_structure_shapes(_stack(), shapes)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))
    assert [block[0].out_features for block in fresh] == widths


def test_every_int_attribute_surgery_sets_is_recorded(monkeypatch):
    seen = []
    original = Undo.set

    def spy(self, obj, name, value):
        if isinstance(obj, nn.Module) and isinstance(value, int):
            seen.append(name)
        original(self, obj, name, value)

    monkeypatch.setattr(Undo, "set", spy)
    _pruned()
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    pk.prune_structured(tiny_llama(1), None, structures="mlp,heads", ratio=0.5, method="magnitude", refine=None)
    assert seen and set(seen) <= set(SHAPE_ATTRS)


def test_merge_lays_a_second_record_over_the_first():
    a = {"version": 1, "parameters": {"x.weight": [2, 3]}, "attributes": {"x": {"out_features": 2}}}
    b = {"version": 1, "parameters": {"y.weight": [4, 3]}, "attributes": {"x": {"in_features": 3}}}
    assert merge_shapes(a, b) == {"version": 1, "parameters": {"x.weight": [2, 3], "y.weight": [4, 3]},
                                  "attributes": {"x": {"out_features": 2, "in_features": 3}}}


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["parameters"].update({"9.weight": [1, 1]}), "no parameter slot"),
    (lambda s: s["attributes"].update({"0.0": {"training": 1}}), "only integer"),
    (lambda s: s["parameters"].update({"2.2.weight": [8, "x"]}), "non-negative integers"),
    (lambda s: s.update(version=7), "version"),
])
def test_a_bad_record_is_refused_and_the_model_is_unchanged(edit, match):
    shapes = pk.structure_shapes(_pruned())
    edit(shapes)
    fresh = _stack()
    before = copy.deepcopy(fresh)
    with pytest.raises(ValueError, match=match):
        pk.apply_structure_shapes(fresh, shapes)
    assert str(fresh) == str(before)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), before.state_dict().values()))
    with pytest.raises(TypeError, match="structure_shapes"):
        pk.apply_structure_shapes(fresh, {"weights": {}})
