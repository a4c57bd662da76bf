"""prunekit.formats.codecs: each tensor encoding round trips bit for bit; the smallest one is chosen."""
from itertools import combinations

import pytest
import torch

import prunekit as pk
from prunekit.formats.codecs import decode, encode, encode_nm, encode_unstructured, nm_patterns, nm_slots

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def pruned(shape, keep: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random weights times a random mask: -0.0 where a negative weight was pruned, as w * mask leaves."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return (w * (torch.rand(shape, generator=g) < keep)).to(dtype)


def test_nm_slots_keep_the_non_zeros_then_the_first_zeros():
    nonzero = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    slots = nm_slots(nonzero, 2)
    assert slots.tolist() == [[1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]]
    assert bool((slots | ~nonzero).all()) and (slots.sum(-1) == 2).all()


def test_nm_patterns_are_combinations_in_order():
    table = nm_patterns(2, 4)
    assert [tuple(r.nonzero().flatten().tolist()) for r in table] == list(combinations(range(4), 2))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:8"])
def test_nm_round_trip_with_signed_zeros_and_nan(dtype, pattern):
    p = pk.parse_pattern(pattern)
    for x in (pruned((16, 32), 1.0, dtype), pruned((8, 8, 3, 3), 1.0, dtype, seed=1)):
        x = x * pk.nm_mask(x.float().abs(), p).to(dtype)  # conv: groups along the (kernel position, channel) columns
        x.view(-1)[(x.view(-1) != 0).nonzero()[0]] = float("nan")  # in place of a kept weight
        x[1] = -0.0  # groups with fewer than n non-zeros: their slots hold their first zeros, signs kept
        meta, parts = encode_nm(x, "w", p.m)
        assert (meta["n"], meta["m"]) == (p.n, p.m)
        assert parts["w::values"].shape == (x.shape[0], x[0].numel() * p.n // p.m)
        assert same_bits(decode("w", {**meta, "shape": list(x.shape), "dtype": str(dtype)[6:]}, parts), x)


def test_nm_index_packing_is_the_smaller_of_digits_and_bits():
    x = pruned((8, 16), 1.0)
    meta24, _ = encode_nm(x * pk.nm_mask(x.abs(), pk.NM(2, 4)), "w", 4)
    assert meta24["index"] == {"radix": 6, "per_byte": 3}  # 2.67 bits a group, not 3
    meta18, _ = encode_nm(x * pk.nm_mask(x.abs(), pk.NM(1, 8)), "w", 8)
    assert meta18["index"] == {"bits": 3}  # 8 patterns: 2 digits a byte would take 4 bits


def test_no_nm_view_gives_none():
    assert encode_nm(torch.zeros(64), "w", 4) is None  # 1-D
    assert encode_nm(torch.zeros(4, 6), "w", 4) is None  # 6 columns: not whole groups of 4
    assert encode_nm(torch.ones(4, 8), "w", 4) is None  # every group full


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9])
def test_unstructured_round_trip_with_signed_zeros_and_nan(dtype, keep):
    x = pruned((7, 13), keep, dtype)
    x[0, 0], x[0, 1] = float("nan"), -0.0
    meta, parts = encode_unstructured(x, "w")
    assert meta["nnz"] == int((x != 0).sum())  # NaN != 0: kept
    assert meta["negzero"] is not None  # x[0, 1] at least
    assert same_bits(decode("w", {**meta, "shape": [7, 13], "dtype": str(dtype)[6:]}, parts), x)


def test_encode_chooses_the_smallest_and_keeps_near_dense_tensors_plain():
    x = pruned((32, 64), 1.0)
    choices = {
        "nm": (x * pk.nm_mask(x.abs(), pk.NM(2, 4)), "2:4"),
        "sparse": (x * pk.unstructured_mask(x.abs(), 0.9), "unstructured"),
        "dense": (x, None),
        "almost dense": (x * (torch.arange(x.numel()).reshape(x.shape) != 5), None),
        "ints": (torch.zeros(64, dtype=torch.int64), None),
        "tiny": (torch.zeros(15), None),
    }
    for name, (t, pattern) in choices.items():
        meta, parts = encode(t, name)
        assert meta.get("pattern") == pattern and (pattern is not None or meta["enc"] == "dense"), name
        assert meta["shape"] == list(t.shape) and same_bits(decode(name, meta, parts), t), name


def test_parts_that_do_not_fit_the_metadata_are_refused():
    x = pruned((8, 16), 0.3)
    meta, parts = encode(x, "w")
    assert meta["enc"] == "unstructured"
    with pytest.raises(ValueError, match="values are"):
        decode("w", meta, {**parts, "w::values": parts["w::values"].double()})
    with pytest.raises(ValueError, match="mask keeps"):
        decode("w", meta, {**parts, "w::values": parts["w::values"][1:]})
    with pytest.raises(ValueError, match="metadata says"):
        decode("d", {"enc": "dense", "shape": [3], "dtype": "float32"}, {"d": torch.zeros(4)})
    with pytest.raises(ValueError, match="not supported"):
        decode("w", {**meta, "dtype": "int32"}, parts)
    with pytest.raises(ValueError, match="unknown encoding"):
        decode("w", {**meta, "enc": "zigzag"}, parts)
    y = pruned((8, 16), 1.0)
    meta, parts = encode(y * pk.nm_mask(y.abs(), pk.NM(2, 4)), "w")
    with pytest.raises(ValueError, match="values stored, expected"):
        decode("w", meta, {**parts, "w::values": parts["w::values"][:, 1:]})
    with pytest.raises(ValueError, match="does not match"):
        decode("w", {**meta, "index": {"radix": 5, "per_byte": 3}}, parts)
