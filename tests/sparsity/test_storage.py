"""prunekit.sparsity.storage: one key for tensors that share storage (tied weights)."""
import torch
from torch import nn

from prunekit.sparsity.storage import storage_key


def test_tied_weights_share_a_key_in_the_state_dict():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    state = model.state_dict()
    assert storage_key(state["0.weight"]) == storage_key(state["1.weight"]) is not None


def test_a_copy_or_another_view_of_the_storage_has_its_own_key():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert storage_key(x) == storage_key(x.detach()) == storage_key(x.view(4, 6))
    others = [x.clone(), x.reshape(6, 4), x[1:], x.T, x.view(torch.int32), x[:, :3]]
    keys = {storage_key(t) for t in others}
    assert storage_key(x) not in keys and len(keys) == len(others)


def test_an_empty_tensor_shares_nothing():
    assert storage_key(torch.zeros(0, 4)) is None
