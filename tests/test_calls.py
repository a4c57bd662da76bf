import ast
import pathlib

import pytest
import torch
from torch import nn

import prunekit
from prunekit.calls import as_call, call, eval_mode, forward_until, model_device, to_device


def test_batch_kinds():
    x = torch.ones(2)
    assert as_call(x) == ((x,), {})
    assert as_call((x, x))[0][1] is x
    assert as_call([x])[0][0] is x
    assert as_call({"input_ids": x}) == ((), {"input_ids": x})
    with pytest.raises(TypeError, match="tensors, tuples or mappings, got int"):
        as_call(3)


def test_call_unpacks_each_kind():
    model = nn.Bilinear(2, 3, 1)
    a, b = torch.ones(1, 2), torch.ones(1, 3)
    assert torch.equal(call(model, (a, b)), model(a, b))
    assert torch.equal(call(model, {"input1": a, "input2": b}), model(a, b))
    assert torch.equal(call(nn.Identity(), a), a)


def test_to_device_keeps_structure_and_model_device():
    x = torch.ones(1)
    moved = to_device({"a": [x, (x, 3)], "b": "text"}, "meta")
    assert moved["a"][0].device.type == "meta" and isinstance(moved["a"][1], tuple)
    assert moved["a"][1][1] == 3 and moved["b"] == "text"
    assert model_device(nn.Linear(1, 1, device="meta")).type == "meta"
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_eval_mode_restores_each_modules_own_mode_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()
    model[1].train()  # a mixed model: eval, with one dropout left in train
    with eval_mode(model):
        assert [m.training for m in model.modules()] == [False, False, False]
    assert [m.training for m in model.modules()] == [False, False, True]
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [False, False, True]


def test_forward_until_stops_after_the_block_and_removes_its_hook():
    ran = []
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].register_forward_pre_hook(lambda *_: ran.append("head"))
    forward_until(model, model[0], (torch.ones(1, 2),), {})
    assert ran == [] and len(model[0]._forward_hooks) == 0
    forward_until(model, None, (torch.ones(1, 2),), {})
    assert ran == ["head"]


@pytest.mark.parametrize("module", ["report", "jobs/loading", "accelerate", "eval", "llm"])
def test_layers_above_do_not_import_the_oneshot_pipeline(module):
    tree = ast.parse((pathlib.Path(prunekit.__file__).parent / f"{module}.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.lstrip(".").startswith(("oneshot", "prunekit.oneshot"))]
