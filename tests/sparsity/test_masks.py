import pytest
import torch
from torch import nn

from prunekit.sparsity.masks import MaskSet


def test_apply_verify_state_dict_round_trip():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    masks = MaskSet({"0": torch.rand(4, 4) > 0.5, "1": torch.ones(2, 4, dtype=torch.bool)})
    assert not masks.verify(model)
    masks.apply(model)
    assert masks.verify(model)
    again = MaskSet.from_model(model, ["0", "1"])
    assert torch.equal(again["0"], masks["0"] & (model[0].weight != 0))
    copy = MaskSet({"0": torch.ones(4, 4), "1": torch.ones(2, 4)})
    copy.load_state_dict(masks.state_dict())
    assert torch.equal(copy["0"], masks["0"])
    assert 0 < masks.sparsity() < 1


def test_load_state_dict_rejects_other_model():
    masks = MaskSet({"0": torch.ones(4, 4)})
    with pytest.raises(ValueError, match="names differ"):
        masks.load_state_dict({"x": torch.ones(4, 4)})
    with pytest.raises(ValueError, match="shape"):
        masks.load_state_dict({"0": torch.ones(3, 4)})


def test_parameter_paths_name_attention_weights():
    torch.manual_seed(0)
    attn = nn.Sequential(nn.MultiheadAttention(8, 2))
    keep = torch.rand(24, 8) > 0.5
    masks = MaskSet({"0.in_proj_weight": keep, "0.out_proj.weight": torch.ones(8, 8, dtype=torch.bool)})
    masks.apply(attn)
    assert torch.equal(attn[0].in_proj_weight != 0, keep)  # random weights: no other zeros
    assert masks.verify(attn)
    again = MaskSet.from_model(attn, ["0.in_proj_weight", "0.out_proj"])
    assert torch.equal(again["0.in_proj_weight"], keep)
    with pytest.raises(KeyError, match="'0.nothing' names neither a module nor a parameter"):
        MaskSet({"0.nothing": keep}).apply(attn)
