"""The nn.MultiheadAttention drop-in computes what torch's module computes (before any head goes),
keeps its state_dict keys, runs inside nn.TransformerEncoderLayer, and refuses what it cannot copy."""
import copy

import pytest
import torch
from torch import nn

from prunekit.structures.find import find_structures
from prunekit.structures.mha import PrunedMultiheadAttention, swap_in
from prunekit.structures.surgery import Undo

# float32 attention of width 16 computed in a different order (SDPA vs torch's own kernels)
TOL = dict(rtol=1e-5, atol=1e-6)


def _mha(bias=True, batch_first=True, **kw):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first, **kw).eval()
    with torch.no_grad():  # non-zero biases, so a bias in the wrong place shows
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _inputs(batch_first, batched=True, s=7):
    g = torch.Generator().manual_seed(1)
    shape = lambda t: ((2, t, 16) if batch_first else (t, 2, 16)) if batched else (t, 16)  # noqa: E731
    return torch.randn(shape(5), generator=g), torch.randn(shape(s), generator=g)


def _float(*shape, seed=4):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bool(*shape, seed=2):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    m[..., 0] = False  # every query attends to at least one key
    return m


CALLS = {
    "self": lambda q, kv: dict(query=q, key=q, value=q, need_weights=False),
    "self weights": lambda q, kv: dict(query=q, key=q, value=q),  # one fused q/k/v product
    "cross": lambda q, kv: dict(query=q, key=kv, value=kv, need_weights=False),
    "weights": lambda q, kv: dict(query=q, key=kv, value=kv),
    "per-head weights": lambda q, kv: dict(query=q, key=kv, value=kv, average_attn_weights=False),
    "padding": lambda q, kv: dict(query=q, key=kv, value=kv, need_weights=False, key_padding_mask=_bool(2, 7)),
    "float padding": lambda q, kv: dict(query=q, key=kv, value=kv, need_weights=False,
                                        key_padding_mask=_float(2, 7)),
    "mask": lambda q, kv: dict(query=q, key=kv, value=kv, need_weights=False, attn_mask=_bool(5, 7)),
    "3d mask": lambda q, kv: dict(query=q, key=kv, value=kv, attn_mask=_float(2 * 4, 5, 7),
                                  key_padding_mask=_float(2, 7, seed=3)),
    "causal": lambda q, kv: dict(query=q, key=q, value=q, need_weights=False, is_causal=True,
                                 attn_mask=nn.Transformer.generate_square_subsequent_mask(5)),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_the_drop_in_matches_torch_before_pruning(call, batch_first):
    torch_mha = _mha(batch_first=batch_first)
    mine = PrunedMultiheadAttention.from_torch(copy.deepcopy(torch_mha))
    q, kv = _inputs(batch_first)
    with torch.no_grad():
        want, want_w = torch_mha(**CALLS[call](q, kv))
        got, got_w = mine(**CALLS[call](q, kv))
    torch.testing.assert_close(got, want, **TOL)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, **TOL)


def test_unbatched_and_bias_free_inputs_match_torch():
    torch_mha = _mha(bias=False)
    mine = PrunedMultiheadAttention.from_torch(copy.deepcopy(torch_mha))
    q, kv = _inputs(True, batched=False)
    pad = _bool(7)
    with torch.no_grad():
        want = torch_mha(q, kv, kv, key_padding_mask=pad)
        got = mine(q, kv, kv, key_padding_mask=pad)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert got[0].shape == (5, 16) and mine.in_proj_bias is None and mine.out_proj.bias is None


def test_the_swap_shares_parameters_keeps_state_dict_keys_and_undoes():
    layer = nn.TransformerEncoderLayer(16, 4, 24, batch_first=True, dropout=0.0).eval()
    old = layer.self_attn
    before = copy.deepcopy(layer.state_dict())
    undo = Undo()
    assert swap_in(layer, find_structures(layer, ("heads",)), undo)
    assert isinstance(layer.self_attn, PrunedMultiheadAttention)
    assert layer.state_dict().keys() == before.keys()
    assert layer.self_attn.in_proj_weight is old.in_proj_weight and layer.self_attn.out_proj is old.out_proj
    undo.restore()
    assert layer.self_attn is old


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_transformer_encoder_layer_runs_with_the_drop_in(norm_first):
    dense = nn.TransformerEncoderLayer(16, 4, 24, batch_first=True, dropout=0.0, norm_first=norm_first).eval()
    layer = copy.deepcopy(dense)
    swap_in(layer, find_structures(layer, ("heads",)), Undo())
    x, _ = _inputs(True)
    pad = _bool(2, 5)
    with torch.no_grad():  # torch's fused fast path for `dense`, the drop-in for `layer`
        torch.testing.assert_close(layer(x, src_key_padding_mask=pad), dense(x, src_key_padding_mask=pad), **TOL)
    layer.train()  # and gradients flow through it
    layer(x).sum().backward()
    assert layer.self_attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(kdim=8, vdim=8), "kdim/vdim"),
    (dict(add_bias_kv=True), "add_bias_kv"),
    (dict(add_zero_attn=True), "add_zero_attn"),
])
def test_what_the_drop_in_cannot_copy_is_refused_by_name(kwargs, match):
    model = nn.Sequential(nn.Linear(16, 16))
    model.attn = nn.MultiheadAttention(16, 4, **kwargs)
    with pytest.raises(ValueError, match=f"attn: nn.MultiheadAttention with .*{match}"):
        find_structures(model, ("heads",))
    with pytest.raises(ValueError, match=match):
        PrunedMultiheadAttention.from_torch(model.attn, "attn")


def test_a_mask_of_the_wrong_shape_is_refused():
    mine = PrunedMultiheadAttention.from_torch(_mha())
    q, kv = _inputs(True)
    with pytest.raises(ValueError, match="attn_mask must be"):
        mine(q, kv, kv, attn_mask=torch.zeros(3, 5, 7))
