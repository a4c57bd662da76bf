"""prunekit.formats.packing: bit sets, fixed-width ints and radix digits, their byte layout and refusals."""
import pytest
import torch

from prunekit.formats.packing import (digits_per_byte, pack_bits, pack_ints, pack_radix, unpack_bits, unpack_ints,
                                      unpack_radix)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("count", [0, 1, 9, 5000])
def test_bits_round_trip(density, count):
    bits = torch.rand(count, generator=torch.Generator().manual_seed(count)) < density
    part, codec = pack_bits(bits)
    assert part.dtype == torch.uint8 and codec["bytes"] == (count + 7) // 8
    assert torch.equal(unpack_bits(part, codec, count), bits)


def test_bits_are_little_endian_and_skewed_sets_are_compressed():
    part, codec = pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool))
    assert codec == {"codec": "raw", "bytes": 2} and part.tolist() == [1, 2]
    sparse = torch.rand(80_000, generator=torch.Generator().manual_seed(0)) < 0.1
    part, codec = pack_bits(sparse)
    assert codec["codec"] in ("lzma", "zlib") and part.numel() < 0.6 * codec["bytes"]  # H(0.1) = 0.47 bits
    half = torch.rand(80_000, generator=torch.Generator().manual_seed(0)) < 0.5
    assert pack_bits(half)[1]["codec"] == "raw"  # incompressible: stored as is


def test_a_bit_set_of_the_wrong_size_is_refused():
    part, codec = pack_bits(torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bit set has 2 bytes"):
        unpack_bits(part, codec, 17)
    with pytest.raises(ValueError, match="expected 3"):
        unpack_bits(part, {"codec": "raw", "bytes": 3}, 16)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 13])
def test_ints_round_trip(width):
    values = torch.randint(0, 1 << width, (101,), generator=torch.Generator().manual_seed(width))
    part = pack_ints(values, width)
    assert part.numel() == (101 * width + 7) // 8
    assert torch.equal(unpack_ints(part, width, 101), values)


def test_ints_layout_and_refusal():
    assert pack_ints(torch.tensor([1, 2]), 2).tolist() == [0b1001]  # 1 -> bits 1,0; 2 -> bits 0,1
    with pytest.raises(ValueError, match="index has 1 bytes"):
        unpack_ints(torch.zeros(1, dtype=torch.uint8), 3, 3)


def test_digits_per_byte():
    assert [digits_per_byte(r) for r in (2, 6, 8, 16, 70, 256, 257)] == [8, 3, 2, 2, 1, 1, 0]


@pytest.mark.parametrize("radix", [2, 3, 6, 28, 70])
def test_radix_round_trip(radix):
    k = digits_per_byte(radix)
    values = torch.randint(0, radix, (50,), generator=torch.Generator().manual_seed(radix))
    part = pack_radix(values, radix, k)
    assert part.dtype == torch.uint8 and part.numel() == -(-50 // k)
    assert torch.equal(unpack_radix(part, radix, k, 50), values)


def test_radix_layout_and_refusal():
    assert pack_radix(torch.tensor([1, 2, 3, 4]), 6, 3).tolist() == [1 + 2 * 6 + 3 * 36, 4]  # first digit lowest
    with pytest.raises(ValueError, match="index has 2 bytes, expected 1"):
        unpack_radix(torch.zeros(2, dtype=torch.uint8), 6, 3, 3)
