"""Property test of what ``result.sparsity`` reports: the zeros counted on the model's tensors.

Hypothesis draws a stack of blocks, some with layouts no layer kind handles: fused 3-D expert
tensors (einsum), raw 2-D parameters used with ``@``, an ``nn.Linear`` whose weight is used
functionally (``F.linear``: its forward never runs), and a mixture's router (never expected
pruned); some of their entries are zero already.
After ``pk.prune`` the reported numbers must equal an independent count: every parameter of two
or more dimensions in the blocks (the head, the model's last layer, left dense by rule and not
expected), each left dense one listed with its reason; and ``strict=True`` must refuse exactly
when something expected would stay dense, before any weight changes.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from helpers.property_settings import examples

D = 8


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Fused(nn.Module):
    """Experts as one 3-D tensor, every token through all of them (a dense mixture)."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(experts, D, D) / D ** 0.5)

    def forward(self, x):
        return torch.tanh(torch.einsum("bd,edk->bk", x, self.experts) / self.experts.shape[0])


class Raw(nn.Module):
    """A 2-D parameter used with ``@``, beside a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(D, D) / D ** 0.5)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(self.fc(x) @ self.mix)


class Functional(nn.Module):
    """An nn.Linear whose weight is used by ``F.linear``: a target whose forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(F.linear(x, self.lin.weight, self.lin.bias))


class TopKRouter(nn.Module):
    """A router as transformers 5 writes one: a 2-D weight used functionally, never expected pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, D))


class Routed(nn.Module):
    """Tokens scaled by a router's softmax, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.fc = TopKRouter(), nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(self.fc(x) * F.softmax(F.linear(x, self.router.weight), -1).max(-1, keepdim=True).values)


BLOCKS = {"routed": Routed, "plain": Plain, "fused2": lambda: Fused(2), "fused3": lambda: Fused(3), "raw": Raw, "functional": Functional}


def _model(kinds: list[str], zeros: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(*(BLOCKS[k]() for k in kinds), nn.Linear(D, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights already zero in places: the count must see them
        for p in model.parameters():
            p.masked_fill_(torch.rand(p.shape, generator=g) < zeros, 0.0)
    return model


def _expected(model: nn.Sequential) -> dict[str, nn.Parameter]:
    """The oracle: every parameter of two or more dimensions outside the head and the routers."""
    return {n: p for n, p in model[:-1].named_parameters() if p.dim() >= 2 and ".router." not in n}


@settings(max_examples=examples(12))
@given(kinds=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4).filter(
           lambda ks: any(k in ("plain", "raw", "functional", "routed") for k in ks)),  # a target besides the head
       method=st.sampled_from(["magnitude", "wanda", "sparsegpt"]), sparsity=st.sampled_from([0.3, 0.5, 0.75]),
       zeros=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 3))
def test_reported_sparsity_is_the_counted_sparsity(kinds, method, sparsity, zeros, seed):
    model = _model(kinds, zeros, seed)
    data = [torch.randn(16, D, generator=torch.Generator().manual_seed(seed))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _expected(model)
    data_free = method == "magnitude"
    dense = {n for n in expected
             if n.endswith(("experts", "mix")) or (n.endswith("lin.weight") and not data_free)}
    if dense:  # strict refuses up front and changes nothing
        try:
            pk.prune(model, data, sparsity=sparsity, method=method, strict=True, progress=False)
        except ValueError as exc:
            assert "strict=True" in str(exc) and any(repr(n.removesuffix(".weight")) in str(exc) or repr(n) in str(exc)
                                                     for n in dense), str(exc)
        else:
            raise AssertionError(f"strict=True pruned a model that leaves {sorted(dense)} dense")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pk.prune(model, data, sparsity=sparsity, method=method, strict=not dense, progress=False)
    zeros_n = {n: int((p == 0).sum()) for n, p in expected.items()}
    assert set(result.weights) == set(expected)
    assert result.weights == {n: (zeros_n[n], p.numel()) for n, p in expected.items()}
    assert result.sparsity == sum(zeros_n.values()) / sum(p.numel() for p in expected.values())
    pruned = {r.name + ".weight" for r in result.layers}
    assert pruned == set(expected) - dense
    assert result.layers_sparsity == (sum(zeros_n[n] for n in pruned) / sum(expected[n].numel() for n in pruned)
                                      if pruned else 0.0)
    for n in dense:  # left as it was, and listed with its reason
        assert torch.equal(expected[n], before[n])
        assert result.skipped.get(n) or result.skipped.get(n.removesuffix(".weight")), (n, result.skipped)
    for n in pruned:  # the asked count where nothing was zero before (exact=True)
        assert zeros_n[n] >= round(sparsity * expected[n].numel())
    assert f"{100 * result.sparsity:.2f}% of the" in result.summary()
