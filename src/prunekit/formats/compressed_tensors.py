"""Export a pruned model as a compressed-tensors checkpoint, the sparse format vLLM and llm-compressor read.

The directory is a Hugging Face one: ``config.json`` (the model's config plus a
``quantization_config`` whose ``sparsity_config`` names the format), ``model.safetensors`` and,
if given, the tokenizer. It is written with torch, numpy and safetensors only; the layout is that
of the ``compressed-tensors`` package's sparse compressors (releases 0.9 to 0.14; 0.15 and later
no longer ship them). For each compressed ``<module>.weight`` (2-D, ``[d_out, d_in]`` as stored):

``sparse-bitmask`` (any sparsity)
    ``<module>.shape`` int64 ``[2]``; ``<module>.compressed``: the entries ``!= 0`` in row-major
    order, in the weight's dtype; ``<module>.bitmask`` uint8 ``[d_out, ceil(d_in / 8)]``: bit ``j``
    of row ``i`` is bit ``j % 8`` of byte ``j // 8`` (``numpy.packbits(..., axis=-1,
    bitorder="little")``); ``<module>.row_offsets`` int64 ``[d_out]``: where each row starts in
    ``compressed``.
``sparse-24-bitmask`` (at most 2 non-zeros in every 4 consecutive entries of a row)
    ``<module>.shape`` int64 ``[2, 1]``; ``<module>.compressed`` ``[d_out, d_in / 2]``: the 2 kept
    slots of each group in column order (a group with fewer non-zeros fills them with ``+0.0`` at its
    first zeros);
    ``<module>.bitmask`` as above, with exactly 2 bits set per group.

Every other state-dict entry is stored dense under its own name; a weight tied to an earlier entry
(a tied LM head) is left out, as ``save_pretrained`` does. Zeros come back as ``+0.0`` (the
package drops the sign of ``-0.0``); every other bit is exact.
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

FORMATS = ("auto", "sparse-bitmask", "sparse-24-bitmask")
WEIGHTS_NAME = "model.safetensors"
# the layout written is that of this release of compressed-tensors (the last with sparse compressors)
LAYOUT_VERSION = "0.14.0.1"
_PARTS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
          "sparse-24-bitmask": ("shape", "compressed", "bitmask")}


# -- per-tensor layouts -------------------------------------------------------------------------
def _pack_rows(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))


def _unpack_rows(bitmask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    bits = np.unpackbits(bitmask.numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def is_24(weight: torch.Tensor) -> bool:
    """True if every row of a 2-D weight has at most 2 non-zeros in each group of 4 columns."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``sparse-bitmask`` parts of a 2-D weight (keys ``shape``, ``compressed``, ``bitmask``, ``row_offsets``)."""
    keep = weight != 0  # NaN counts as non-zero; -0.0 does not
    counts = keep.sum(-1)
    return {"shape": torch.tensor(list(weight.shape)), "compressed": weight[keep].contiguous(),
            "bitmask": _pack_rows(keep), "row_offsets": torch.cumsum(counts, 0) - counts}


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``sparse-24-bitmask`` parts of a 2:4 weight (keys ``shape``, ``compressed``, ``bitmask``)."""
    rows, cols = weight.shape
    groups = (weight != 0).reshape(rows, cols // 4, 4)
    fill = (~groups) & ((~groups).cumsum(-1) <= (2 - groups.sum(-1, keepdim=True)))
    keep = (groups | fill).reshape(rows, cols)
    values = weight.masked_fill(fill.reshape(rows, cols), 0)[keep]  # filler slots hold +0.0
    return {"shape": torch.tensor([rows, cols]).reshape(-1, 1),
            "compressed": values.reshape(rows, cols // 2).contiguous(), "bitmask": _pack_rows(keep)}


def decompress(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight from its ``shape``, ``compressed`` and ``bitmask`` parts (either format)."""
    shape = [int(d) for d in parts["shape"].reshape(-1).tolist()]
    keep = _unpack_rows(parts["bitmask"], shape)
    values = parts["compressed"].reshape(-1)
    if int(keep.sum()) != values.numel():
        raise ValueError(f"bitmask keeps {int(keep.sum())} entries but {values.numel()} values are stored")
    out = torch.zeros(shape, dtype=values.dtype)
    out[keep] = values
    return out


# -- which modules are compressed, and how config.json names them -------------------------------
def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)}


def _matches(name: str, module: nn.Module, targets: Iterable[str]) -> bool:
    """compressed-tensors' rule: a target is a class name (any base class), a module name, or ``re:REGEX``."""
    return any((re.match(t[3:], name) is not None) if t.startswith("re:") else (t == name or t in _class_names(module))
               for t in targets)


def targets_and_ignore(model: nn.Module, compressed: set[str]) -> tuple[list[str], list[str]]:
    """``targets`` / ``ignore`` lists that select exactly the ``compressed`` module names.

    As llm-compressor writes them: a class name when at least half of that class's modules with a
    weight are compressed (the others go to ``ignore``), else the module names themselves.
    """
    modules = dict(model.named_modules())
    weighted = [n for n, m in modules.items() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    targets: list[str] = []
    ignore: list[str] = []
    for cls in dict.fromkeys(type(modules[n]).__name__ for n in modules if n in compressed):
        members = [n for n in weighted if cls in _class_names(modules[n])]
        hit = [n for n in members if n in compressed]
        if all(_matches(n, modules[n], targets) for n in hit):
            continue  # already selected by a base class's name
        if len(hit) >= len(members) - len(hit):
            targets.append(cls)
            ignore += [n for n in members if n not in compressed and n not in ignore]
        else:
            targets += [n for n in hit if n not in targets]
    chosen = {n for n, m in modules.items() if _matches(n, m, targets) and not _matches(n, m, ignore)}
    if chosen != compressed:  # a class shared in an unexpected way: fall back to exact names
        targets, ignore = sorted(compressed), []
    return targets, ignore


def _candidates(model: nn.Module, state: Mapping[str, torch.Tensor], min_sparsity: float) -> dict[str, float]:
    """Module name -> sparsity, for 2-D floating weights sparse enough to compress and not tied."""
    seen: dict[tuple, str] = {}
    shared: set[str] = set()
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            shared |= {key, seen[ident]}
        seen.setdefault(ident, key)
    out = {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        w = state.get(key)
        if name and w is not None and key not in shared and w.dim() == 2 and w.is_floating_point() and w.numel():
            sparsity = float((w == 0).sum()) / w.numel()
            if sparsity >= min_sparsity:
                out[name] = sparsity
    return out


def _check_args(model: Any, format: str, min_sparsity: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed_tensors needs an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 < min_sparsity <= 1:
        raise ValueError(f"min_sparsity must be a number in (0, 1], got {min_sparsity!r}")
    for p in model.parameters():
        if p.is_meta:
            raise ValueError("the model has weights on the meta device (not materialised); load real weights first")


# -- save / load --------------------------------------------------------------------------------
def save_compressed_tensors(model: nn.Module, folder: str | os.PathLike, *, format: str = "auto",
                            min_sparsity: float = 0.4, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``model`` to ``folder`` as a compressed-tensors sparse checkpoint.

    ``format``: ``"sparse-bitmask"``, ``"sparse-24-bitmask"`` (every compressed weight must be
    2:4 along its rows) or ``"auto"`` (the 2:4 layout when every compressed weight is 2:4, else
    the bitmask). A 2-D weight is compressed when at least ``min_sparsity`` of it is zero; the
    rest is stored dense and listed in ``ignore``. ``tokenizer`` (optional) is saved beside it.
    A model without a Hugging Face ``config`` gets a ``config.json`` holding only the
    ``quantization_config``. Returns a summary: ``bytes``, ``dense_bytes``, ``format``,
    ``compressed`` (module names), ``quantization_config``.
    """
    _check_args(model, format, min_sparsity)
    state = OrderedDict((k, v.detach()) for k, v in model.state_dict().items())
    candidates = _candidates(model, state, float(min_sparsity))
    not24 = [n for n in candidates if not is_24(state[f"{n}.weight"])]
    if format == "sparse-24-bitmask" and not24:
        raise ValueError(f"format='sparse-24-bitmask' needs 2:4 weights, but {not24[:5]} are not 2:4 along their "
                         "rows; prune with pattern='2:4', or pass format='sparse-bitmask' (or 'auto')")
    fmt = format if format != "auto" else ("sparse-24-bitmask" if candidates and not not24 else "sparse-bitmask")
    compress = sparse24_compress if fmt == "sparse-24-bitmask" else bitmask_compress
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    dense_bytes = zeros = total = 0
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied to an earlier entry (e.g. lm_head to the embeddings): stored once
        seen.add(ident)
        t = t.cpu()
        dense_bytes += t.numel() * t.element_size()
        if t.is_floating_point():
            zeros, total = zeros + int((t == 0).sum()), total + t.numel()
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in candidates:
            tensors.update({f"{module}.{part}": v for part, v in compress(t).items()})
        else:
            tensors[key] = t.contiguous().clone()
    targets, ignore = targets_and_ignore(model, set(candidates))
    qconfig = {"quant_method": "compressed-tensors", "version": LAYOUT_VERSION,
               "sparsity_config": {"format": fmt, "global_sparsity": zeros / total if total else 0.0,
                                   "ignore": ignore, "registry_requires_subclass": False,
                                   "sparsity_structure": "2:4" if fmt == "sparse-24-bitmask" else "unstructured",
                                   "targets": targets},
               "transform_config": {}}
    if not candidates:
        qconfig["sparsity_config"]["format"] = "dense"
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _write_config(model, folder, qconfig)
    from safetensors.torch import save_file

    path = os.path.join(folder, WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"path": path, "bytes": os.path.getsize(path), "dense_bytes": dense_bytes,
            "format": qconfig["sparsity_config"]["format"], "compressed": sorted(candidates),
            "quantization_config": qconfig}


def _write_config(model: nn.Module, folder: str, qconfig: dict) -> None:
    config = getattr(model, "config", None)
    data: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(folder)
    data["quantization_config"] = qconfig
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def load_compressed_tensors(folder: str | os.PathLike, model: nn.Module | None = None) -> Any:
    """The dense state dict of a directory written by :func:`save_compressed_tensors` (or by
    compressed-tensors' sparse compressors): every ``<module>.weight`` rebuilt from its parts.
    Tied entries left out on save are absent here too.

    With ``model``: checks every key, shape and dtype first (nothing changes when one differs; a
    key may be absent only when it is tied to one that is present), loads the weights into the
    model in place and returns it.
    """
    state = _read_state(folder)
    if model is None:
        return state
    ours = model.state_dict()
    tied = {k for k, v in ours.items() if k not in state and any(
        v.data_ptr() == w.data_ptr() and v.shape == w.shape for j, w in ours.items() if j in state)}
    missing = [k for k in ours if k not in state and k not in tied]
    unexpected = [k for k in state if k not in ours]
    bad = [f"{k}: file {tuple(v.shape)} {v.dtype}, model {tuple(ours[k].shape)} {ours[k].dtype}"
           for k, v in state.items() if k in ours and (v.shape != ours[k].shape or v.dtype != ours[k].dtype)]
    if missing or unexpected or bad:
        raise ValueError(f"{os.fspath(folder)!r} does not fit this {type(model).__name__}: " + "; ".join(
            s for s in (f"missing in file {missing[:5]}" if missing else "",
                        f"not in model {unexpected[:5]}" if unexpected else "",
                        f"shape/dtype mismatch {bad[:5]}" if bad else "") if s))
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


def _read_state(folder: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        fmt = json.load(f).get("quantization_config", {}).get("sparsity_config", {}).get("format", "dense")
    if fmt not in _PARTS and fmt != "dense":
        raise ValueError(f"{folder!r} has sparsity format {fmt!r}; this reader knows {', '.join(_PARTS)}")
    stored = load_file(os.path.join(folder, WEIGHTS_NAME))
    names = _PARTS.get(fmt, ())
    modules = [k[: -len(".bitmask")] for k in stored if k.endswith(".bitmask")] if names else []
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, t in stored.items():
        module, _, part = key.rpartition(".")
        if module in modules and part in names:
            if part == "bitmask":
                out[f"{module}.weight"] = decompress({p: stored[f"{module}.{p}"] for p in ("shape", "compressed", "bitmask")})
            continue
        out[key] = t
    return out
