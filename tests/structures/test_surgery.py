"""Surgery makes modules smaller without changing what the kept units compute, and undoes exactly."""
import copy

import pytest
import torch
from torch import nn

from prunekit.structures.find import find_structures
from prunekit.structures.surgery import Undo, matrix, shrink


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_removing_dead_neurons_changes_nothing_and_undo_restores_every_tensor():
    m = _MLP()
    with torch.no_grad():
        m.fc2.weight[:, [1, 4, 7]] = 0  # neurons 1, 4, 7 contribute nothing
    x = torch.randn(5, 6)
    before = m(x)
    params = {k: v.clone() for k, v in m.state_dict().items()}
    (s,) = find_structures(m)
    keep = [0, 2, 3, 5, 6, 8, 9]
    undo = Undo()
    shrink(m, s, keep, matrix(m.fc2)[:, keep].clone(), None, undo)
    assert m.fc1.weight.shape == (7, 6) and m.fc1.out_features == 7 and m.fc2.in_features == 7
    # the same float32 products, summed over fewer (zero) terms: float32 rounding only
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-6)
    undo.restore()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in params.items())
    assert m.fc1.out_features == 10 and m.fc2.in_features == 10


def test_conv1d_layout_keeps_outputs_by_columns():
    import pytest
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(8, 3)  # nf=8 outputs, nx=3 inputs; weight [3, 8]
    nn.init.normal_(c.weight)
    x = torch.randn(2, 3)
    full = c(x)
    from prunekit.structures.surgery import keep_outputs

    keep_outputs(c, torch.tensor([1, 5]), Undo())
    assert c.weight.shape == (3, 2) and c.nf == 2
    torch.testing.assert_close(c(x), full[:, [1, 5]])


def test_fused_qkv_rows_go_from_every_third_and_equal_zeroed_heads():
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    dense = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_head=4, n_layer=1, vocab_size=30)).eval()
    m = copy.deepcopy(dense)
    (s,) = find_structures(m, ("heads",))
    attn = m.h[0].attn
    w = attn.c_attn.weight.detach().clone()  # Conv1D: [d_in, 3 * 16], q | k | v, 4 heads of 4
    keep, cols = [1, 3], torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
    undo = Undo()
    shrink(m, s, keep, matrix(attn.c_proj)[:, cols].clone(), None, undo)
    assert torch.equal(attn.c_attn.weight, w[:, torch.cat([cols, 16 + cols, 32 + cols])])
    assert (attn.num_heads, attn.split_size, attn.head_dim, attn.embed_dim, attn.c_proj.nx) == (2, 8, 4, 16, 8)
    with torch.no_grad():
        dense.h[0].attn.c_proj.weight[[0, 1, 2, 3, 8, 9, 10, 11]] = 0  # heads 0 and 2 write nothing
        x = torch.randint(0, 30, (2, 6))
        torch.testing.assert_close(m(x).last_hidden_state, dense(x).last_hidden_state, rtol=1e-5, atol=1e-6)
    undo.restore()
    assert torch.equal(attn.c_attn.weight, w) and attn.num_heads == 4 and attn.split_size == 16
