"""module_shapes / apply_module_shapes: every sized module's record, given back to a model built
dense, matches a module built at the recorded size (the oracle); bad records change nothing."""
import json

import pytest
import torch
from torch import nn

from prunekit.formats.module_shapes import apply_module_shapes, module_shapes


def net(width: int, norm: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, width, 3), nn.GroupNorm(2, width), nn.Flatten(), nn.LayerNorm(norm),
                         nn.Linear(norm, 3), nn.BatchNorm1d(3))


def test_a_dense_model_given_the_record_of_a_smaller_one_computes_the_same():
    small, big = net(4, 4 * 36), net(8, 8 * 36)
    record = json.loads(json.dumps(module_shapes(small)))  # plain JSON data
    assert record["modules"]["3"]["attributes"] == {"normalized_shape": [144]}
    assert record["modules"]["5"]["buffers"]["running_mean"] == [3]
    apply_module_shapes(big, record)
    big.load_state_dict(small.state_dict())
    x = torch.randn(5, 2, 8, 8)
    small.eval(), big.eval()
    assert big[3].normalized_shape == (144,) and big[1].num_channels == 4 and big[0].out_channels == 4
    assert torch.equal(big(x), small(x))


def test_a_bad_record_is_refused_and_the_model_is_unchanged():
    big = net(8, 8 * 36)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    record = module_shapes(net(4, 4 * 36))
    record["modules"]["4"]["parameters"]["weight"] = [3, -1]
    with pytest.raises(ValueError, match="4.weight: a shape must be a list of non-negative integers"):
        apply_module_shapes(big, record)
    after = big.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    assert big[0].out_channels == 8 and big[3].normalized_shape == (288,)
    with pytest.raises(TypeError, match="not a module_shapes record"):
        apply_module_shapes(big, {"version": 1})
    with pytest.raises(ValueError, match="version 2"):
        apply_module_shapes(big, {"version": 2, "modules": {}})
    bad = module_shapes(net(4, 4 * 36))
    bad["modules"]["0"]["attributes"]["padding_mode"] = 1
    with pytest.raises(ValueError, match="0.padding_mode: only the size attributes"):
        apply_module_shapes(big, bad)
    assert big[0].out_channels == 8
