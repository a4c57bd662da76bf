"""The chain check: where a block's inputs are the previous block's outputs, on toy models
whose forward is written out, so which blocks chain is known by reading it."""
import pytest
import torch
from torch import nn

from prunekit.calls import StopForward
from prunekit.oneshot.links import ChainCheck, same


class Block(nn.Module):
    """``x -> tanh(lin(x) + bias)``, ``bias`` an optional second argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, bias=None, *, memory=None):
        h = self.lin(x) if bias is None else self.lin(x) + bias
        return torch.tanh(h if memory is None else h + memory.mean(1, keepdim=True))


class EncoderDecoder(nn.Module):
    """Two stacks: the decoder's first block takes the embedded target, not the encoder's
    output, which every decoder block gets as ``memory=``; decoder block 1 on gets the bias
    block 0 computed (like T5's position bias)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList(Block() for _ in range(2))
        self.dec = nn.ModuleList(Block() for _ in range(3))
        self.embed = nn.Linear(6, 6)

    def forward(self, src, tgt):
        h = src
        for block in self.enc:
            h = block(h)
        memory, y, bias = h, self.embed(tgt), None
        for block in self.dec:
            y = block(y, bias, memory=memory)
            bias = torch.ones_like(y) if bias is None else bias
        return y


def _starts(model, names, call, capture="chain"):
    modules = dict(model.named_modules())
    blocks = [(n, modules[n]) for n in names]
    with ChainCheck(blocks) as check:
        try:
            model(*call)
        except StopForward:
            pass
    return check.starts(capture)


def _call():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 6, generator=g), torch.randn(2, 3, 6, generator=g)


def test_a_plain_stack_is_one_chain():
    model = nn.Sequential(Block(), Block(), Block())
    assert _starts(model, ["0", "1", "2"], (torch.randn(2, 6),)) == [True, False, False]
    assert _starts(model, ["0", "1", "2"], (torch.randn(2, 6),), capture="rerun") == [True, True, True]


def test_a_second_stack_and_a_changed_argument_start_new_chains():
    names = ["enc.0", "enc.1", "dec.0", "dec.1", "dec.2"]
    # dec.0: not fed by enc.1; dec.1: its bias changes (None -> ones); dec.2: the same as dec.1's
    assert _starts(EncoderDecoder(), names, _call()) == [True, False, True, True, False]


def test_the_forward_stops_once_every_block_has_run():
    model = EncoderDecoder()
    modules = dict(model.named_modules())
    ran = []
    model.embed.register_forward_hook(lambda *_: ran.append("embed"))
    with ChainCheck([("enc.0", modules["enc.0"])]):
        with pytest.raises(StopForward):
            model(*_call())
    assert ran == []  # stopped after enc.0, before the decoder's embedding


def test_a_block_never_called_is_named():
    model = EncoderDecoder()
    model.unused = Block()
    with pytest.raises(ValueError, match=r"block 'unused' is never called.*blocks="):
        _starts(model, ["enc.0", "unused"], _call())


def test_blocks_out_of_order_are_named_with_the_order_to_use():
    with pytest.raises(ValueError, match=r"list .dec.0. before .enc.0..*\['enc.0', 'dec.0'\]"):
        _starts(EncoderDecoder(), ["dec.0", "enc.0"], _call())


def test_same_compares_nested_calls():
    a = torch.arange(4.0)
    assert same(((a, None), {"m": a, "n": 3}), ((a.clone(), None), {"m": a, "n": 3}))
    assert not same(((a,), {}), ((a + 1,), {}))
    assert not same(((a,), {}), ((a.double(),), {}))
    assert not same(((a,), {}), ((a,), {"m": None}))
    assert not same((a,), (a, a))
    assert not same(a, None)


def test_prune_with_chain_equals_rerun_across_stacks():
    """End to end: blocks= across both stacks (and past the changed bias) with the default
    capture='chain' prunes exactly as re-running the model at every block does."""
    import copy

    import prunekit as pk

    torch.manual_seed(0)
    chained = EncoderDecoder().eval()
    rerun = copy.deepcopy(chained)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 5, 6, generator=g), torch.randn(4, 3, 6, generator=g)) for _ in range(2)]
    names = ["enc.0", "enc.1", "dec.0", "dec.1", "dec.2"]
    pk.prune(chained, data, sparsity=0.5, method="sparsegpt", blocks=names, progress=False)
    pk.prune(rerun, data, sparsity=0.5, method="sparsegpt", blocks=names, capture="rerun", progress=False)
    for (key, a), b in zip(chained.state_dict().items(), rerun.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
