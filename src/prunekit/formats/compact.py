"""Compressed sparse checkpoints: ``save`` / ``load`` / ``load_masks``, and a Hugging Face round trip.

A checkpoint is an ordinary safetensors file whose metadata says ``format: prunekit-sparse``,
``version: 2`` and, under ``tensors``, a JSON object describing every state-dict entry (in order):

``{"enc": "dense"}``
    stored as-is under its own name.
``{"enc": "unstructured", "shape", "dtype", "nnz", "mask": codec, "negzero": codec | null}``
    ``name::mask``: a keep-bit for every entry in row-major order (bit ``i`` of the tensor is bit
    ``i % 8`` of byte ``i // 8``, i.e. ``numpy.packbits(..., bitorder="little")``), set where the entry
    is not ``+0.0`` / ``-0.0`` (NaN counts as non-zero); ``name::values``: the ``nnz`` kept entries in
    row-major order, in the tensor's own dtype.
``{"enc": "nm", "n", "m", ...}``
    for a weight whose 2-D view (:func:`prunekit.sparsity.layout.to_matrix`) keeps at most ``n`` of every
    ``m`` consecutive columns: ``name::values`` ``[d_out, d_in*n/m]`` (the ``n`` slots of each group in
    column order; a group with fewer non-zeros fills its slots with its first zeros) and
    ``name::index``: per group the rank of its slot pattern among the ``C(m, n)`` combinations
    (lexicographic order, as :func:`itertools.combinations`), packed ``k`` base-``C`` digits per byte
    (first digit least significant; ``k = 3`` for 2:4, i.e. 2.67 bits per group of 4 against the
    bound log2 6 = 2.585) or, where that is not smaller, ``ceil(log2 C)`` bits each, little-endian.
``{"enc": "alias", "of": key}``
    a tensor that shares its storage with an earlier one (a tied LM head): stored once.

Exactness: every tensor is restored bit for bit. The sign of every zero that is not stored as a
value (``-0.0`` is what ``w * mask`` leaves where a negative weight was pruned) is kept in an
optional ``name::negzero`` bit set over the unstored entries (in the order above), written only
when a tensor has a ``-0.0`` there. Bit sets with a density away from 1/2 are compressed with lzma
(zlib where Python lacks lzma) when that makes them smaller (``codec = {"codec": "raw" | "lzma" |
"zlib", "bytes": <packed size>}``); lzma comes within ~4% of the entropy at density 0.1.
Each stored part carries a CRC-32 in the metadata, checked on load, and ``header_crc`` is the CRC-32
of the whole header (the safetensors tensor index and the metadata, without ``header_crc`` itself,
as JSON with sorted keys and no spaces), so a damaged header is refused too rather than read with,
say, a renamed metadata key. Version 1 files (no header checksum) still load. A floating tensor with zeros
is written in whichever encoding is smallest, if that saves at least 1% over dense; integer and
bool tensors are stored dense. Metadata also has ``patterns`` (a count per encoding) and
``model_class``.

Size per entry at density ``d`` (fp32): unstructured ``<= 1 + 32 d`` bits (the mask shrinks to
~H(d) with lzma at low density), 2:4 ``16 + 0.67`` bits; plus, where pruning left ``-0.0``, one bit
per unstored zero (about ``1 - d`` bits: incompressible, as the signs are the pruned weights').
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import warnings
import zlib
from collections import OrderedDict
from itertools import combinations
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..sparsity.layout import from_matrix, to_matrix
from .atomic import write_file
from ..sparsity.masks import MaskSet
from ..sparsity.storage import storage_key

FORMAT = "prunekit-sparse"
VERSION = 2  # 2: the header carries its own checksum (header_crc)
_READABLE = ("1", "2")
HEADER_CRC = "header_crc"
# float dtype -> integer dtype of the same width (all encoding works on bit patterns)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
_NM_CANDIDATES = (4, 8)  # group sizes M tried for an N:M encoding
_DTYPES = {str(t).removeprefix("torch."): t for t in
           (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
            torch.int16, torch.int8, torch.uint8, torch.bool)}


_CODECS: dict[str, Any] = {}
_DECOMPRESS: dict[str, Any] = {"zlib": zlib.decompress}
try:  # lzma is in the standard library, but optional in some Python builds
    import lzma

    _CODECS["lzma"] = lambda b: lzma.compress(b, preset=6)
    _DECOMPRESS["lzma"] = lzma.decompress
except ImportError:  # pragma: no cover
    pass
_CODECS["zlib"] = lambda b: zlib.compress(b, 6)


class CheckpointError(ValueError):
    """A file that is not a readable prunekit checkpoint, or that does not fit the given model."""


# -- bit sets ----------------------------------------------------------------------------------
def _pack_bits(bits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Packed bits, compressed (lzma, else zlib) when the set is skewed enough for that to pay."""
    flat = bits.reshape(-1)
    raw = np.packbits(flat.numpy(), bitorder="little").tobytes()
    data, codec = raw, "raw"
    density = float(flat.float().mean()) if flat.numel() else 0.5
    if abs(density - 0.5) > 0.1:  # below ~0.97 bits of entropy per bit
        for name, compress in _CODECS.items():
            packed = compress(raw)
            if len(packed) < len(data):
                data, codec = packed, name
            break  # the first available codec only (lzma gets ~0.49 bits/entry at density 0.1)
    part = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return part, {"codec": codec, "bytes": len(raw)}


def _unpack_bits(part: torch.Tensor, codec: dict, count: int) -> torch.Tensor:
    data = part.numpy().tobytes()
    if codec["codec"] != "raw":
        data = _DECOMPRESS[codec["codec"]](data)
    if len(data) != codec["bytes"] or len(data) * 8 < count:
        raise ValueError(f"bit set has {len(data)} bytes, expected {codec['bytes']} for {count} bits")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def _pack_ints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian bit-pack non-negative ints of ``width`` bits."""
    bits = (values.reshape(-1, 1).to(torch.int64) >> torch.arange(width)) & 1
    return torch.from_numpy(np.packbits(bits.to(torch.bool).numpy().reshape(-1), bitorder="little"))


def _unpack_ints(part: torch.Tensor, width: int, count: int) -> torch.Tensor:
    if part.numel() * 8 < count * width:
        raise ValueError(f"index has {part.numel()} bytes, expected {math.ceil(count * width / 8)}")
    bits = np.unpackbits(part.numpy(), count=count * width, bitorder="little").reshape(count, width)
    return (torch.from_numpy(bits.astype(np.int64)) << torch.arange(width)).sum(-1)


def _digits_per_byte(radix: int) -> int:
    """How many base-``radix`` digits fit in one byte (0 when radix > 256)."""
    k = 0
    while radix ** (k + 1) <= 256:
        k += 1
    return k


def _pack_radix(values: torch.Tensor, radix: int, k: int) -> torch.Tensor:
    """``k`` base-``radix`` digits per byte, the first digit least significant."""
    pad = (-values.numel()) % k
    digits = torch.cat([values.reshape(-1), values.new_zeros(pad)]).reshape(-1, k)
    return (digits * radix ** torch.arange(k)).sum(-1).to(torch.uint8)


def _unpack_radix(part: torch.Tensor, radix: int, k: int, count: int) -> torch.Tensor:
    if part.numel() != math.ceil(count / k):
        raise ValueError(f"index has {part.numel()} bytes, expected {math.ceil(count / k)}")
    digits = (part.to(torch.int64).unsqueeze(-1) // radix ** torch.arange(k)) % radix
    return digits.reshape(-1)[:count]


def _patterns(n: int, m: int) -> torch.Tensor:
    """All ``C(m, n)`` keep patterns of a group, as bools ``[C, m]``, in combinations order."""
    out = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for r, combo in enumerate(combinations(range(m), n)):
        out[r, list(combo)] = True
    return out


def _is_zero(bits: torch.Tensor) -> torch.Tensor:
    """+0.0 or -0.0, on an integer view of a float tensor."""
    return (bits == 0) | (bits == torch.iinfo(bits.dtype).min)


# -- encoders: tensor -> (meta, parts) ----------------------------------------------------------
def _negzero(bits: torch.Tensor, stored: torch.Tensor, meta: dict, parts: dict, key: str) -> None:
    neg = bits[~stored] == torch.iinfo(bits.dtype).min
    if bool(neg.any()):
        parts[key + "::negzero"], meta["negzero"] = _pack_bits(neg)
    else:
        meta["negzero"] = None


def _encode_unstructured(x: torch.Tensor, key: str) -> tuple[dict, dict]:
    bits = x.reshape(-1).view(_INT_VIEW[x.dtype])
    keep = ~_is_zero(bits)
    meta: dict[str, Any] = {"enc": "unstructured", "nnz": int(keep.sum())}
    parts: dict[str, torch.Tensor] = {}
    parts[key + "::mask"], meta["mask"] = _pack_bits(keep)
    parts[key + "::values"] = bits[keep].view(x.dtype)
    _negzero(bits, keep, meta, parts, key)
    return meta, parts


def _encode_nm(x: torch.Tensor, key: str, m: int) -> tuple[dict, dict] | None:
    if x.dim() < 2 or x.dim() > 4:
        return None
    mat = to_matrix(x.view(_INT_VIEW[x.dtype]))
    rows, cols = mat.shape
    if cols % m or cols == 0:
        return None
    groups = mat.reshape(rows, cols // m, m)
    nz = ~_is_zero(groups)
    count = nz.sum(-1)
    n = max(int(count.max()), 1)
    if n >= m:
        return None
    # exactly n slots per group: the non-zeros, then the group's first zeros
    free = (~nz) & ((~nz).cumsum(-1) <= (n - count).unsqueeze(-1))
    slots = nz | free
    code = (slots.to(torch.int64) << torch.arange(m)).sum(-1)
    table = _patterns(n, m)
    lookup = torch.full((1 << m,), -1, dtype=torch.int64)
    lookup[(table.to(torch.int64) << torch.arange(m)).sum(-1)] = torch.arange(len(table))
    ranks, k = lookup[code], _digits_per_byte(len(table))
    width = max(1, math.ceil(math.log2(len(table))))
    if k and 8 / k < width:  # e.g. 2:4: 3 groups per byte (6**3 <= 256), 2.67 bits per group
        meta: dict[str, Any] = {"enc": "nm", "n": n, "m": m, "index": {"radix": len(table), "per_byte": k}}
        index = _pack_radix(ranks, len(table), k)
    else:
        meta = {"enc": "nm", "n": n, "m": m, "index": {"bits": width}}
        index = _pack_ints(ranks, width)
    parts = {key + "::values": groups[slots].view(x.dtype).reshape(rows, cols // m * n),
             key + "::index": index}
    _negzero(groups.reshape(-1), slots.reshape(-1), meta, parts, key)
    return meta, parts


def _nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _encode(x: torch.Tensor, key: str) -> tuple[dict, dict]:
    """The smallest encoding of one tensor (dense when nothing is gained)."""
    best: tuple[dict, dict] = ({"enc": "dense"}, {key: x.contiguous().clone()})
    if x.dtype in _INT_VIEW and x.numel() >= 16:
        bits = x.reshape(-1).view(_INT_VIEW[x.dtype])
        if bool(_is_zero(bits).any()):
            candidates = [_encode_unstructured(x, key)] + [_encode_nm(x, key, m) for m in _NM_CANDIDATES]
            limit = 0.99 * _nbytes(best[1])  # a nearly dense tensor stays a plain tensor
            for cand in candidates:
                if cand is not None and _nbytes(cand[1]) < limit:
                    best, limit = cand, _nbytes(cand[1])
    meta = dict(best[0])
    if meta["enc"] != "dense":
        meta["pattern"] = f"{meta['n']}:{meta['m']}" if meta["enc"] == "nm" else "unstructured"
    meta.update(shape=list(x.shape), dtype=str(x.dtype).removeprefix("torch."))
    return meta, best[1]


# -- decoders -----------------------------------------------------------------------------------
def _decode(key: str, meta: dict, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    enc = meta["enc"]
    dtype = _DTYPES.get(meta.get("dtype", ""))
    shape = tuple(meta.get("shape", ()))
    if enc == "dense":
        x = parts[key]
        if dtype is not None and (x.dtype != dtype or tuple(x.shape) != shape):
            raise ValueError(f"stored as {x.dtype} {tuple(x.shape)}, metadata says {dtype} {shape}")
        return x
    if dtype not in _INT_VIEW:
        raise ValueError(f"sparse encoding of dtype {meta.get('dtype')!r} is not supported")
    itype, numel = _INT_VIEW[dtype], math.prod(shape)
    values = parts[key + "::values"]
    if values.dtype != dtype:
        raise ValueError(f"values are {values.dtype}, expected {dtype}")
    values = values.reshape(-1).view(itype)
    if enc == "unstructured":
        keep = _unpack_bits(parts[key + "::mask"], meta["mask"], numel)
        if int(keep.sum()) != values.numel() or values.numel() != meta["nnz"]:
            raise ValueError(f"mask keeps {int(keep.sum())} entries but {values.numel()} values are stored")
        bits = torch.zeros(numel, dtype=itype)
        bits[keep] = values
        _apply_negzero(bits, keep, meta, parts, key)
        return bits.view(dtype).reshape(shape)
    if enc == "nm":
        n, m, index = int(meta["n"]), int(meta["m"]), meta["index"]
        rows = shape[0]
        cols = numel // rows if rows else 0
        ngroups = rows * cols // m
        if values.numel() != ngroups * n:
            raise ValueError(f"{values.numel()} values stored, expected {ngroups * n} for {n}:{m}")
        table = _patterns(n, m)
        if "radix" in index:
            if int(index["radix"]) != len(table) or int(index["per_byte"]) != _digits_per_byte(len(table)):
                raise ValueError(f"index radix {index} does not match {n}:{m}")
            ranks = _unpack_radix(parts[key + "::index"], len(table), int(index["per_byte"]), ngroups)
        else:
            ranks = _unpack_ints(parts[key + "::index"], int(index["bits"]), ngroups)
        if ngroups and int(ranks.max()) >= len(table):
            raise ValueError("N:M index out of range")
        slots = table[ranks].reshape(-1)
        bits = torch.zeros(ngroups * m, dtype=itype)
        bits[slots] = values
        _apply_negzero(bits, slots, meta, parts, key)
        return from_matrix(bits.reshape(rows, cols), shape).view(dtype)
    raise ValueError(f"unknown encoding {enc!r}")


def _apply_negzero(bits: torch.Tensor, stored: torch.Tensor, meta: dict, parts: Mapping, key: str) -> None:
    if meta.get("negzero"):
        where = (~stored).nonzero().squeeze(1)
        neg = _unpack_bits(parts[key + "::negzero"], meta["negzero"], where.numel())
        bits[where[neg]] = torch.iinfo(bits.dtype).min


# -- save ---------------------------------------------------------------------------------------
def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    if isinstance(obj, nn.Module):
        return OrderedDict(obj.state_dict())
    if isinstance(obj, Mapping) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return OrderedDict(obj)
    raise TypeError(f"save() needs an nn.Module or a state_dict of tensors, got {type(obj).__name__}")


def _crc(t: torch.Tensor) -> int:
    data = t.detach().reshape(-1)
    data = data.view(torch.uint8) if data.numel() and data.dtype != torch.bool else data.to(torch.uint8)
    return zlib.crc32(data.numpy()) if data.numel() else 0


def save(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict[str, Any]:
    """Write ``model``'s state_dict (or a state_dict) to ``path`` as a compressed safetensors file.

    The write is atomic: the file appears under ``path`` complete or not at all. NaN values are
    saved exactly, with a warning. Returns a summary: bytes written, bytes of the dense tensors,
    the encoding of every tensor.
    """
    state = _state_dict(model)
    path = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    entries: "OrderedDict[str, dict]" = OrderedDict()
    seen: dict[tuple, str] = {}
    nan_keys, dense_bytes = [], 0
    for key, t in state.items():
        if "::" in key:
            raise ValueError(f"state_dict key {key!r} contains '::', which the format reserves")
        t = t.detach()
        dense_bytes += t.numel() * t.element_size()
        alias = storage_key(t)
        if alias is not None and alias in seen:
            entries[key] = {"enc": "alias", "of": seen[alias]}
            continue
        if alias is not None:
            seen[alias] = key
        t = t.cpu()
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            nan_keys.append(key)
        meta, parts = _encode(t, key)
        meta["crc"] = {p: _crc(v) for p, v in parts.items()}
        entries[key] = meta
        tensors.update(parts)
    if nan_keys:
        warnings.warn(f"saving NaN values (kept exactly) in {nan_keys[:5]}"
                      + (f" and {len(nan_keys) - 5} more" if len(nan_keys) > 5 else ""), RuntimeWarning, stacklevel=2)
    patterns: dict[str, int] = {}
    for e in entries.values():
        patterns[e.get("pattern", e["enc"])] = patterns.get(e.get("pattern", e["enc"]), 0) + 1
    metadata = {"format": FORMAT, "version": str(VERSION), "tensors": json.dumps(entries),
                "patterns": json.dumps(patterns),
                "model_class": type(model).__name__ if isinstance(model, nn.Module) else ""}
    from safetensors.torch import save as st_save
    write_file(path, _sign_header(st_save(tensors, metadata=metadata)))
    return {"path": path, "bytes": os.path.getsize(path), "dense_bytes": dense_bytes, "patterns": patterns,
            "encodings": {k: e.get("pattern", e["enc"]) for k, e in entries.items()}}


def _header_checksum(header: Mapping[str, Any]) -> str:
    """CRC-32 (8 hex digits) of a parsed safetensors header, leaving out ``header_crc`` itself."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != HEADER_CRC}
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(canonical.encode()):08x}"


def _sign_header(blob: bytes) -> list:
    """A safetensors file (as chunks) whose metadata also holds the header's own checksum.

    The data section is reused as is: tensor offsets count from its start, so a longer header
    moves nothing. The header stays JSON padded with spaces to a multiple of 8 bytes.
    """
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + hlen])
    header["__metadata__"][HEADER_CRC] = _header_checksum(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)), text, memoryview(blob)[8 + hlen:]]


# -- load ---------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(entries, stored parts, metadata) of a checkpoint, every failure as a CheckpointError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from e
    try:
        if len(data) < 8:
            raise ValueError(f"file has {len(data)} bytes, too short for a safetensors header")
        (hlen,) = struct.unpack("<Q", data[:8])
        if hlen > len(data) - 8:
            raise ValueError("header is longer than the file (truncated?)")
        header = json.loads(data[8: 8 + hlen])
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("header has no metadata object")
    except ValueError as e:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: {e}") from e
    if HEADER_CRC in meta and meta[HEADER_CRC] != _header_checksum(header):
        raise CheckpointError(f"{path!r} is corrupt: header checksum mismatch")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a prunekit checkpoint (format={meta.get('format')!r}); "
                              "a plain safetensors file loads with safetensors.torch.load_file")
    if meta.get("version") not in _READABLE:
        raise CheckpointError(f"{path!r} has prunekit format version {meta.get('version')!r}; "
                              f"this prunekit reads versions {', '.join(_READABLE)}")
    if meta["version"] != "1" and HEADER_CRC not in meta:
        raise CheckpointError(f"{path!r} is corrupt: its header has no checksum ({HEADER_CRC})")
    try:
        from safetensors.torch import load as st_load
        parts = st_load(data)
        entries = json.loads(meta["tensors"], object_pairs_hook=OrderedDict)
        _check_entries(entries)
    except Exception as e:  # safetensors raises its own SafetensorError on truncated/corrupt data
        raise CheckpointError(f"{path!r} is corrupt or truncated: {e}") from e
    return entries, parts, meta


def _check_entries(entries: Any) -> None:
    if not isinstance(entries, dict):
        raise ValueError("metadata 'tensors' is not an object")
    for key, e in entries.items():
        if not isinstance(e, dict) or e.get("enc") not in ("dense", "unstructured", "nm", "alias"):
            raise ValueError(f"tensor {key!r} has no known encoding")
        if e["enc"] == "alias":
            if entries.get(e.get("of"), {}).get("enc") in (None, "alias"):
                raise ValueError(f"tensor {key!r} is an alias of a missing tensor {e.get('of')!r}")
        elif not (isinstance(e.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in e["shape"])
                  and e.get("dtype") in _DTYPES):
            raise ValueError(f"tensor {key!r} has no valid shape/dtype")


def _decode_all(path, entries: Mapping[str, dict], parts: Mapping[str, torch.Tensor],
                keys=None) -> "OrderedDict[str, torch.Tensor]":
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, meta in entries.items():
        if keys is not None and key not in keys:
            continue
        try:
            if meta["enc"] == "alias":
                if meta["of"] not in out:
                    out[meta["of"]] = _decode_one(key, entries[meta["of"]], parts, meta["of"])
                out[key] = out[meta["of"]]
                continue
            out[key] = _decode_one(key, meta, parts, key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{os.fspath(path)!r} is corrupt: tensor {key!r}: {e}") from e
    return out


def _decode_one(key: str, meta: dict, parts: Mapping[str, torch.Tensor], stored_as: str) -> torch.Tensor:
    for part, crc in meta.get("crc", {}).items():
        if part not in parts:
            raise ValueError(f"missing stored part {part!r}")
        if _crc(parts[part]) != crc:
            raise ValueError(f"checksum mismatch in {part!r}")
    return _decode(stored_as, meta, parts)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module | "OrderedDict[str, torch.Tensor]":
    """Read a checkpoint written by :func:`save`.

    Without ``model``: returns the state_dict (CPU tensors, tied entries as one tensor). With a
    model: checks every key, shape and dtype first (nothing is changed when anything differs),
    then loads the tensors into it in place, bit for bit, and returns the model.
    """
    entries, parts, meta = _read(path)
    if model is not None:
        _check_fits(path, entries, model, meta)
    state = _decode_all(path, entries, parts)
    if model is None:
        return state
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model


def _check_fits(path, entries: Mapping[str, dict], model: nn.Module, meta: Mapping[str, str]) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ours = model.state_dict()
    shapes = {k: (tuple(e["shape"]), e["dtype"]) for k, e in entries.items() if e["enc"] != "alias"}
    for k, e in entries.items():
        if e["enc"] == "alias":
            shapes[k] = shapes.get(e["of"], (None, None))
    missing, unexpected = [k for k in ours if k not in shapes], [k for k in shapes if k not in ours]
    bad = [f"{k}: file {shapes[k][0]} {shapes[k][1]}, model {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
           for k, v in ours.items() if k in shapes
           and (shapes[k][0] != tuple(v.shape) or shapes[k][1] != str(v.dtype).removeprefix("torch."))]
    if missing or unexpected or bad:
        saved = meta.get("model_class") or "?"
        raise CheckpointError(
            f"{os.fspath(path)!r} (saved from {saved}) does not fit this {type(model).__name__}: "
            + "; ".join(s for s in (f"missing in file {missing[:5]}" if missing else "",
                                     f"not in model {unexpected[:5]}" if unexpected else "",
                                     f"shape/dtype mismatch {bad[:5]}" if bad else "") if s))


def load_masks(path: str | os.PathLike, names: list[str] | None = None) -> MaskSet:
    """Keep-masks (``weight != 0``, as :meth:`MaskSet.from_model`) of a checkpoint, keyed by module name.

    Default: every ``*.weight`` stored sparse (unstructured or N:M). ``names`` (module names) picks
    the layers, whatever their encoding, e.g. ``list(pruner.targets)``.
    """
    entries, parts, _ = _read(path)

    def module(key: str) -> str:
        return key[: -len(".weight")] if key.endswith(".weight") else ("" if key == "weight" else key)

    if names is None:
        keys = [k for k, e in entries.items() if (k == "weight" or k.endswith(".weight"))
                and e.get("enc") in ("unstructured", "nm")]
    else:
        keys = [f"{n}.weight" if n else "weight" for n in names]
        missing = [k for k in keys if k not in entries]
        if missing:
            raise CheckpointError(f"{os.fspath(path)!r} has no weights {missing[:5]}")
    needed = set(keys) | {entries[k]["of"] for k in keys if entries[k]["enc"] == "alias"}
    state = _decode_all(path, entries, parts, needed)
    return MaskSet({module(k): state[k] != 0 for k in keys})


# -- Hugging Face -------------------------------------------------------------------------------
CHECKPOINT_NAME = "model.prunekit.safetensors"


def save_pretrained_compressed(model: nn.Module, directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` (via the model's config) plus a compressed ``model.prunekit.safetensors``.

    ``config.json`` names the model's class under ``architectures`` (as ``save_pretrained`` does),
    so a model built from a config alone (e.g. ``Qwen2ForCausalLM(config)``) comes back as its own
    class; the model's own config is not changed. For an ordinary checkpoint that plain
    transformers loads, call ``model.save_pretrained(dir)``: a pruned model is a plain model, its
    zeros are just zeros.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError("save_pretrained_compressed needs a Hugging Face model (with .config)")
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    return save(model, os.path.join(directory, CHECKPOINT_NAME))


def load_pretrained_compressed(directory: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained_compressed` (transformers needed).

    The class is ``model_class`` if given, else the config's ``architectures`` (else the class the
    checkpoint recorded) when transformers has it, else ``AutoModel``.
    """
    try:
        import transformers
    except ImportError as e:  # transformers is an optional extra
        raise ImportError("load_pretrained_compressed needs transformers: pip install 'prunekit[hf]'") from e
    config = transformers.AutoConfig.from_pretrained(directory)
    path = os.path.join(directory, CHECKPOINT_NAME)
    if model_class is None:
        archs = getattr(config, "architectures", None) or [_recorded_class(path)]
        model_class = getattr(transformers, archs[0], None) if archs[0] else None
    model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    return load(path, model.eval())


def _recorded_class(path: str) -> str:
    """The model class a checkpoint's metadata names ('' when it names none or cannot be read)."""
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("model_class", "")
    except Exception:  # noqa: BLE001 - load() reports an unreadable file properly
        return ""
