"""Packing for the compact format: bit sets, fixed-width integers and base-``C`` digits as bytes.

Bits are little-endian within a byte (bit ``i`` of a set is bit ``i % 8`` of byte ``i // 8``, i.e.
``numpy.packbits(..., bitorder="little")``). A bit set whose density is away from 1/2 is compressed
with lzma (zlib where Python lacks lzma) when that makes it smaller; lzma comes within ~4% of the
entropy at density 0.1. Digits are packed ``k`` per byte, the first digit least significant.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Callable

import numpy as np
import torch

#: compressors tried for a skewed bit set (the first available only), and every known decompressor
COMPRESS: dict[str, Callable[[bytes], bytes]] = {}
DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {"zlib": zlib.decompress}
try:  # lzma is in the standard library, but optional in some Python builds
    import lzma

    COMPRESS["lzma"] = lambda b: lzma.compress(b, preset=6)
    DECOMPRESS["lzma"] = lzma.decompress
except ImportError:  # pragma: no cover
    pass
COMPRESS["zlib"] = lambda b: zlib.compress(b, 6)


def pack_bits(bits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Packed bits as uint8, compressed when the set is skewed enough for that to pay; and the
    codec entry that reads them back (``{"codec": "raw" | "lzma" | "zlib", "bytes": <packed size>}``)."""
    flat = bits.reshape(-1)
    raw = np.packbits(flat.numpy(), bitorder="little").tobytes()
    data, codec = raw, "raw"
    density = float(flat.float().mean()) if flat.numel() else 0.5
    if abs(density - 0.5) > 0.1:  # below ~0.97 bits of entropy per bit
        for name, compress in COMPRESS.items():
            packed = compress(raw)
            if len(packed) < len(data):
                data, codec = packed, name
            break  # the first available codec only (lzma gets ~0.49 bits/entry at density 0.1)
    part = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return part, {"codec": codec, "bytes": len(raw)}


def unpack_bits(part: torch.Tensor, codec: dict[str, Any], count: int) -> torch.Tensor:
    """The ``count`` bools that :func:`pack_bits` packed; ValueError when the sizes disagree."""
    data = part.numpy().tobytes()
    if codec["codec"] != "raw":
        data = DECOMPRESS[codec["codec"]](data)
    if len(data) != codec["bytes"] or len(data) * 8 < count:
        raise ValueError(f"bit set has {len(data)} bytes, expected {codec['bytes']} for {count} bits")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def pack_ints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative ints of ``width`` bits each, bit-packed little-endian."""
    bits = (values.reshape(-1, 1).to(torch.int64) >> torch.arange(width)) & 1
    return torch.from_numpy(np.packbits(bits.to(torch.bool).numpy().reshape(-1), bitorder="little"))


def unpack_ints(part: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The ``count`` ints that :func:`pack_ints` packed (int64)."""
    if part.numel() * 8 < count * width:
        raise ValueError(f"index has {part.numel()} bytes, expected {math.ceil(count * width / 8)}")
    bits = np.unpackbits(part.numpy(), count=count * width, bitorder="little").reshape(count, width)
    return (torch.from_numpy(bits.astype(np.int64)) << torch.arange(width)).sum(-1)


def digits_per_byte(radix: int) -> int:
    """How many base-``radix`` digits fit in one byte (0 when radix > 256)."""
    k = 0
    while radix ** (k + 1) <= 256:
        k += 1
    return k


def pack_radix(values: torch.Tensor, radix: int, k: int) -> torch.Tensor:
    """Base-``radix`` digits, ``k`` per byte, the first digit least significant (uint8)."""
    pad = (-values.numel()) % k
    digits = torch.cat([values.reshape(-1), values.new_zeros(pad)]).reshape(-1, k)
    return (digits * radix ** torch.arange(k)).sum(-1).to(torch.uint8)


def unpack_radix(part: torch.Tensor, radix: int, k: int, count: int) -> torch.Tensor:
    """The ``count`` digits that :func:`pack_radix` packed (int64)."""
    if part.numel() != math.ceil(count / k):
        raise ValueError(f"index has {part.numel()} bytes, expected {math.ceil(count / k)}")
    digits = (part.to(torch.int64).unsqueeze(-1) // radix ** torch.arange(k)) % radix
    return digits.reshape(-1)[:count]
