"""Property tests of ``pk.save`` / ``pk.load``: a damaged checkpoint is refused, never loaded wrong.

Random state dicts (unstructured and N:M sparse weights, ``-0.0`` and NaN entries, fp16/bf16,
integer and bool buffers, tied tensors) are saved, then byte flips or a truncation are applied
anywhere in the file: the 8-byte length prefix, the JSON header (prunekit's metadata included)
or the tensor data. Loading must raise ``CheckpointError`` or give back the exact original
tensors; a model given to ``load`` must be left untouched when it raises.
"""
from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from helpers.property_settings import examples

def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of ``t`` for bit-for-bit comparison (``-0.0 != 0.0``, NaN == same NaN)."""
    views = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}
    return t.view(views[t.dtype]) if t.dtype in views else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _sparse(g: torch.Generator, shape, dtype, kind: str, negzero: bool, nan: bool) -> torch.Tensor:
    w = torch.randn(shape, generator=g)
    if kind == "2:4" and w.dim() > 1 and pk.to_matrix(w).shape[1] % 4 == 0:
        keep = pk.nm_mask(w.abs(), pk.NM(2, 4))
    elif kind == "dense":
        keep = torch.ones_like(w, dtype=torch.bool)
    else:
        keep = pk.unstructured_mask(w.abs(), float(torch.rand((), generator=g)) * 0.99)
    w = w * keep if negzero else torch.where(keep, w, torch.zeros(()))  # w * keep leaves -0.0
    if nan and w.numel():
        w.view(-1)[0] = float("nan")
    return w.to(dtype)


@st.composite
def state_dicts(draw) -> "dict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    state: dict[str, torch.Tensor] = {}
    for i in range(draw(st.integers(1, 4))):
        shape = draw(st.sampled_from([(8, 16), (6, 12), (4, 4, 3, 3), (5, 8, 1), (16,), (3, 7), (0, 4)]))
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]))
        kind = draw(st.sampled_from(["unstructured", "2:4", "dense"]))
        state[f"w{i}"] = _sparse(g, shape, dtype, kind, draw(st.booleans()), draw(st.booleans()) and i == 0)
    if draw(st.booleans()):
        state["steps"] = torch.tensor(draw(st.integers(0, 10**6)), dtype=torch.int64)
    if draw(st.booleans()):
        state["flags"] = torch.rand(5, generator=g) > 0.5
    if draw(st.booleans()):
        state["tied"] = state["w0"]  # same storage: stored once, as an alias
    return state


class _Holder(nn.Module):
    """A module whose state_dict has exactly the given keys (buffers; tied ones stay tied)."""

    def __init__(self, state: "dict[str, torch.Tensor]") -> None:
        super().__init__()
        for k, v in state.items():
            self.register_buffer(k, v)


@st.composite
def damage(draw, size: int, header_end: int) -> tuple[str, object]:
    """``("truncate", n)`` or ``("flip", [(pos, xor), ...])`` with positions in a drawn region."""
    if draw(st.integers(0, 3)) == 0:
        return "truncate", draw(st.integers(0, size - 1))
    region = draw(st.sampled_from(["prefix", "header", "header", "data"]))
    lo, hi = {"prefix": (0, 7), "header": (8, header_end - 1), "data": (header_end, size - 1)}[region]
    if lo > hi:
        lo, hi = 0, size - 1
    flips = draw(st.lists(st.tuples(st.integers(lo, hi),
                                    st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), st.integers(1, 255))),
                          min_size=1, max_size=3))
    return "flip", flips


def canonical(raw: bytes) -> bytes:
    """The same checkpoint with its JSON header re-serialised with sorted keys: safetensors writes
    its metadata map in a per-process random order, so without this a drawn byte position would
    fall on different fields from run to run and failures would not reproduce."""
    hlen = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8: 8 + hlen]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + raw[8 + hlen:]


def _apply(data: bytes, how: tuple[str, object]) -> tuple[bytes, bool]:
    """The damaged bytes and whether only the length prefix / JSON header was touched."""
    kind, arg = how
    if kind == "truncate":
        return data[:arg], False
    out = bytearray(data)
    for pos, xor in arg:
        out[pos] ^= xor
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    return bytes(out), all(pos < header_end for pos, _ in arg)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder for every example's file, and no fsync: 600 examples spent a third of their time
    creating folders and flushing to disk, which is not what is tested here (test_export.py tests
    the atomic write)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield str(tmp_path_factory.mktemp("damaged"))


@settings(max_examples=examples(600))
@given(state=state_dicts(), data=st.data())
def test_damaged_checkpoint_is_refused_or_exact(scratch, state, data):
    path = os.path.join(scratch, "m.safetensors")  # every example overwrites it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "saving NaN values (kept exactly)"
        pk.save(state, path)
    raw = canonical(open(path, "rb").read())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    how = data.draw(damage(len(raw), header_end), label="damage")
    bad, header_only = _apply(raw, how)
    if bad == raw:
        return
    where = "truncated" if how[0] == "truncate" else "header flip" if header_only else "data flip"
    with open(path, "wb") as f:
        f.write(bad)

    # 1. into a model: CheckpointError with the model untouched, or exactly the saved tensors
    target = _Holder({k: torch.full_like(v, 7) if v.dtype != torch.bool else ~v for k, v in state.items()})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    try:
        pk.load(path, target)
    except pk.CheckpointError:
        event(f"{where}: refused")
        assert all(same(v, before[k]) for k, v in target.state_dict().items()), "failed load changed the model"
    else:
        event(f"{where}: loaded exact (into a model)")
        _judge(dict(target.state_dict()), state, header_only, how)

    # 2. as a state_dict: CheckpointError, or the same keys and tensors bit for bit
    try:
        loaded = pk.load(path)
    except pk.CheckpointError:
        return
    _judge(loaded, state, header_only, how)
    event(f"{where}: loaded exact (as a state_dict)")


def _judge(loaded, state, header_only: bool, how) -> None:
    """Loaded tensors must be the saved ones bit for bit, but for the known header gap."""
    assert list(loaded) == list(state) and all(same(loaded[k], state[k]) for k in state), \
        f"silently wrong weights after {how}"


def _flip_in_metadata(path, field: str, letter: int) -> None:
    """Flip the lowest bit of letter ``letter`` of the first ``"field"`` in prunekit's metadata."""
    raw = bytearray(path.read_bytes())
    header = raw[8: 8 + struct.unpack("<Q", raw[:8])[0]].decode()
    raw[8 + header.index(f'\\"{field}\\": ') + 2 + letter] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("field, letter", [("tied", 0), ("w0", 1), ("negzero", 0)],
                         ids=["renames-tied-entry", "duplicate-key-drops-w0", "loses-zero-signs"])
def test_header_flip_in_metadata_is_refused(tmp_path, field, letter):
    """A bit flipped in the metadata is refused by the header checksum (before it, ``tied`` loaded
    as ``uied``, ``w0`` became a second ``w1`` that dropped the first tensor, and ``negzero``
    became ``oegzero`` so every ``-0.0`` of ``w2`` loaded as ``+0.0``)."""
    path = tmp_path / "m.safetensors"
    w = torch.randn(4, 8)
    state = {"w0": w, "w1": torch.randn(4), "w2": w * (w.abs() > 0.5)}
    if field == "tied":
        state["tied"] = w
    pk.save(state, path)
    _flip_in_metadata(path, field, letter)
    with pytest.raises(pk.CheckpointError):
        pk.load(path)
