"""prunekit's compact checkpoint: ``save`` / ``load`` / ``load_masks`` of one safetensors file.

The file is an ordinary safetensors file whose metadata says ``format: prunekit-sparse``,
``version: 2`` and, under ``tensors``, a JSON object describing every state-dict entry (in order):
an encoding of :mod:`.codecs` (``dense``, ``unstructured``, ``nm``, each with ``shape`` and
``dtype``), or ``{"enc": "alias", "of": key}`` for a tensor that shares its storage with an earlier
one (a tied LM head: :func:`prunekit.sparsity.storage.storage_key`), stored once. Every tensor is
restored bit for bit, the sign of every zero included.

Each stored part carries a CRC-32 in the metadata, checked on load, and ``header_crc`` is the CRC-32
of the whole header (the safetensors tensor index and the metadata, without ``header_crc`` itself,
as JSON with sorted keys and no spaces), so a damaged header is refused too rather than read with,
say, a renamed metadata key. Version 1 files (no header checksum) still load. Metadata also has
``patterns`` (a count per encoding) and ``model_class``. The write is atomic (:mod:`.atomic`).
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from ..sparsity.masks import MaskSet
from ..sparsity.storage import storage_key
from .atomic import write_file
from .codecs import DTYPES, decode, encode

FORMAT = "prunekit-sparse"
VERSION = 2  # 2: the header carries its own checksum (header_crc)
_READABLE = ("1", "2")
HEADER_CRC = "header_crc"


class CheckpointError(ValueError):
    """A file that is not a readable prunekit checkpoint, or that does not fit the given model."""


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
        meta, parts = encode(t, key)
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
                  and e.get("dtype") in DTYPES):
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
    return decode(stored_as, meta, parts)


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
