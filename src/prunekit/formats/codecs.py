"""Tensor encodings of the compact format, each exact to the bit: one tensor <-> (meta, stored parts).

``{"enc": "dense"}``
    stored as-is under its own name.
``{"enc": "unstructured", "shape", "dtype", "nnz", "mask": codec, "negzero": codec | null}``
    ``name::mask``: a keep-bit for every entry in row-major order (see :mod:`.packing`), set where
    the entry is not ``+0.0`` / ``-0.0`` (NaN counts as non-zero); ``name::values``: the ``nnz``
    kept entries in row-major order, in the tensor's own dtype.
``{"enc": "nm", "n", "m", "index", ...}``
    for a weight whose 2-D view (:func:`prunekit.sparsity.layout.to_matrix`) keeps at most ``n`` of
    every ``m`` consecutive columns: ``name::values`` ``[d_out, d_in*n/m]`` (the ``n`` slots of each
    group in column order, :func:`nm_slots`) and ``name::index``: per group the rank of its slot
    pattern among the ``C(m, n)`` combinations (lexicographic order, as
    :func:`itertools.combinations`), packed ``k`` base-``C`` digits per byte (``k = 3`` for 2:4,
    i.e. 2.67 bits per group of 4 against the bound log2 6 = 2.585) or, where that is not smaller,
    ``ceil(log2 C)`` bits each.

The sign of every zero that is not stored as a value (``-0.0`` is what ``w * mask`` leaves where a
negative weight was pruned) is kept in an optional ``name::negzero`` bit set over the unstored
entries (in the order above), written only when a tensor has a ``-0.0`` there. A floating tensor
with zeros is written in whichever encoding is smallest, if that saves at least 1% over dense;
integer and bool tensors are stored dense.

Size per entry at density ``d`` (fp32): unstructured ``<= 1 + 32 d`` bits (the mask shrinks to
~H(d) with lzma at low density), 2:4 ``16 + 0.67`` bits; plus, where pruning left ``-0.0``, one bit
per unstored zero (about ``1 - d`` bits: incompressible, as the signs are the pruned weights').
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Mapping

import torch

from ..sparsity.layout import from_matrix, to_matrix
from .packing import digits_per_byte, pack_bits, pack_ints, pack_radix, unpack_bits, unpack_ints, unpack_radix

Parts = dict[str, torch.Tensor]
# float dtype -> integer dtype of the same width (all encoding works on bit patterns)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}
NM_CANDIDATES = (4, 8)  # group sizes M tried for an N:M encoding
DTYPES = {str(t).removeprefix("torch."): t for t in
          (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)}


def is_zero(bits: torch.Tensor) -> torch.Tensor:
    """+0.0 or -0.0, on an integer view of a float tensor."""
    return (bits == 0) | (bits == torch.iinfo(bits.dtype).min)


def nm_patterns(n: int, m: int) -> torch.Tensor:
    """All ``C(m, n)`` keep patterns of a group, as bools ``[C, m]``, in combinations order."""
    out = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for r, combo in enumerate(combinations(range(m), n)):
        out[r, list(combo)] = True
    return out


def nm_slots(nonzero: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` stored slots of every group (bools, ``[..., m]``): its non-zeros, then, in a
    group with fewer than ``n``, its first zeros. ``nonzero`` may have at most ``n`` per group."""
    zero = ~nonzero
    missing = n - nonzero.sum(-1, keepdim=True)
    return nonzero | (zero & (zero.cumsum(-1) <= missing))


# -- encoders: tensor -> (meta, parts) ----------------------------------------------------------
def _negzero(bits: torch.Tensor, stored: torch.Tensor, meta: dict, parts: Parts, key: str) -> None:
    neg = bits[~stored] == torch.iinfo(bits.dtype).min
    if bool(neg.any()):
        parts[key + "::negzero"], meta["negzero"] = pack_bits(neg)
    else:
        meta["negzero"] = None


def encode_unstructured(x: torch.Tensor, key: str) -> tuple[dict, Parts]:
    """A keep-bit per entry plus the kept values (any float tensor)."""
    bits = x.reshape(-1).view(INT_VIEW[x.dtype])
    keep = ~is_zero(bits)
    meta: dict[str, Any] = {"enc": "unstructured", "nnz": int(keep.sum())}
    parts: Parts = {}
    parts[key + "::mask"], meta["mask"] = pack_bits(keep)
    parts[key + "::values"] = bits[keep].view(x.dtype)
    _negzero(bits, keep, meta, parts, key)
    return meta, parts


def encode_nm(x: torch.Tensor, key: str, m: int) -> tuple[dict, Parts] | None:
    """The N:M encoding with groups of ``m`` and the smallest ``n`` that holds every group's
    non-zeros; None where the tensor has no such N:M view (or every group is full)."""
    if x.dim() < 2 or x.dim() > 4:
        return None
    mat = to_matrix(x.view(INT_VIEW[x.dtype]))
    rows, cols = mat.shape
    if cols % m or cols == 0:
        return None
    groups = mat.reshape(rows, cols // m, m)
    nz = ~is_zero(groups)
    n = max(int(nz.sum(-1).max()), 1)
    if n >= m:
        return None
    slots = nm_slots(nz, n)
    code = (slots.to(torch.int64) << torch.arange(m)).sum(-1)
    table = nm_patterns(n, m)
    lookup = torch.full((1 << m,), -1, dtype=torch.int64)
    lookup[(table.to(torch.int64) << torch.arange(m)).sum(-1)] = torch.arange(len(table))
    ranks, k = lookup[code], digits_per_byte(len(table))
    width = max(1, math.ceil(math.log2(len(table))))
    if k and 8 / k < width:  # e.g. 2:4: 3 groups per byte (6**3 <= 256), 2.67 bits per group
        meta: dict[str, Any] = {"enc": "nm", "n": n, "m": m, "index": {"radix": len(table), "per_byte": k}}
        index = pack_radix(ranks, len(table), k)
    else:
        meta = {"enc": "nm", "n": n, "m": m, "index": {"bits": width}}
        index = pack_ints(ranks, width)
    parts = {key + "::values": groups[slots].view(x.dtype).reshape(rows, cols // m * n),
             key + "::index": index}
    _negzero(groups.reshape(-1), slots.reshape(-1), meta, parts, key)
    return meta, parts


def nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes the stored parts take."""
    return sum(t.numel() * t.element_size() for t in parts.values())


def encode(x: torch.Tensor, key: str) -> tuple[dict, Parts]:
    """The smallest encoding of one CPU tensor stored under ``key`` (dense when nothing is gained):
    its metadata (with ``shape``, ``dtype`` and, when sparse, ``pattern``) and its stored parts."""
    best: tuple[dict, Parts] = ({"enc": "dense"}, {key: x.contiguous().clone()})
    if x.dtype in INT_VIEW and x.numel() >= 16:
        bits = x.reshape(-1).view(INT_VIEW[x.dtype])
        if bool(is_zero(bits).any()):
            candidates = [encode_unstructured(x, key)] + [encode_nm(x, key, m) for m in NM_CANDIDATES]
            limit = 0.99 * nbytes(best[1])  # a nearly dense tensor stays a plain tensor
            for cand in candidates:
                if cand is not None and nbytes(cand[1]) < limit:
                    best, limit = cand, nbytes(cand[1])
    meta = dict(best[0])
    if meta["enc"] != "dense":
        meta["pattern"] = f"{meta['n']}:{meta['m']}" if meta["enc"] == "nm" else "unstructured"
    meta.update(shape=list(x.shape), dtype=str(x.dtype).removeprefix("torch."))
    return meta, best[1]


# -- decoders -----------------------------------------------------------------------------------
def decode(key: str, meta: dict, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor stored under ``key`` with metadata ``meta``, bit for bit; ValueError when the
    parts do not fit the metadata."""
    enc = meta["enc"]
    dtype = DTYPES.get(meta.get("dtype", ""))
    shape = tuple(meta.get("shape", ()))
    if enc == "dense":
        x = parts[key]
        if dtype is not None and (x.dtype != dtype or tuple(x.shape) != shape):
            raise ValueError(f"stored as {x.dtype} {tuple(x.shape)}, metadata says {dtype} {shape}")
        return x
    if dtype not in INT_VIEW:
        raise ValueError(f"sparse encoding of dtype {meta.get('dtype')!r} is not supported")
    values = parts[key + "::values"]
    if values.dtype != dtype:
        raise ValueError(f"values are {values.dtype}, expected {dtype}")
    values = values.reshape(-1).view(INT_VIEW[dtype])
    if enc == "unstructured":
        return _decode_unstructured(key, meta, parts, values, shape).view(dtype)
    if enc == "nm":
        return _decode_nm(key, meta, parts, values, shape).view(dtype)
    raise ValueError(f"unknown encoding {enc!r}")


def _decode_unstructured(key: str, meta: dict, parts: Mapping[str, torch.Tensor], values: torch.Tensor,
                         shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    keep = unpack_bits(parts[key + "::mask"], meta["mask"], numel)
    if int(keep.sum()) != values.numel() or values.numel() != meta["nnz"]:
        raise ValueError(f"mask keeps {int(keep.sum())} entries but {values.numel()} values are stored")
    bits = torch.zeros(numel, dtype=values.dtype)
    bits[keep] = values
    _apply_negzero(bits, keep, meta, parts, key)
    return bits.reshape(shape)


def _decode_nm(key: str, meta: dict, parts: Mapping[str, torch.Tensor], values: torch.Tensor,
               shape: tuple[int, ...]) -> torch.Tensor:
    n, m, index = int(meta["n"]), int(meta["m"]), meta["index"]
    numel, rows = math.prod(shape), shape[0]
    cols = numel // rows if rows else 0
    ngroups = rows * cols // m
    if values.numel() != ngroups * n:
        raise ValueError(f"{values.numel()} values stored, expected {ngroups * n} for {n}:{m}")
    table = nm_patterns(n, m)
    if "radix" in index:
        if int(index["radix"]) != len(table) or int(index["per_byte"]) != digits_per_byte(len(table)):
            raise ValueError(f"index radix {index} does not match {n}:{m}")
        ranks = unpack_radix(parts[key + "::index"], len(table), int(index["per_byte"]), ngroups)
    else:
        ranks = unpack_ints(parts[key + "::index"], int(index["bits"]), ngroups)
    if ngroups and int(ranks.max()) >= len(table):
        raise ValueError("N:M index out of range")
    slots = table[ranks].reshape(-1)
    bits = torch.zeros(ngroups * m, dtype=values.dtype)
    bits[slots] = values
    _apply_negzero(bits, slots, meta, parts, key)
    return from_matrix(bits.reshape(rows, cols), shape)


def _apply_negzero(bits: torch.Tensor, stored: torch.Tensor, meta: dict, parts: Mapping[str, torch.Tensor],
                   key: str) -> None:
    if meta.get("negzero"):
        where = (~stored).nonzero().squeeze(1)
        neg = unpack_bits(parts[key + "::negzero"], meta["negzero"], where.numel())
        bits[where[neg]] = torch.iinfo(bits.dtype).min
