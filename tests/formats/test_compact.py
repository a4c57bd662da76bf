"""prunekit.formats.compact: compressed checkpoints, bit-exact round trips, atomic writes, refusals, masks."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from torch import nn

import prunekit as pk
from prunekit.formats.compact import HEADER_CRC, CheckpointError, _sign_header, load, load_masks, save


class Net(nn.Module):
    """Linear + Conv2d + a tied head + an integer buffer + a bf16 parameter."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.conv = nn.Conv2d(8, 16, 3)
        self.fc1 = nn.Linear(32, width)
        self.fc2 = nn.Linear(width, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.low = nn.Parameter(torch.randn(24, 16).to(torch.bfloat16))
        self.register_buffer("steps", torch.arange(5))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def assert_same_bits(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k].contiguous()), bits(b[k].contiguous())), k


def pruned_net(seed: int = 0, sparsity: float = 0.8) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for name in ("conv", "fc1", "fc2"):
            w = getattr(net, name).weight
            w.mul_(pk.unstructured_mask(w.abs(), sparsity))  # leaves -0.0 where w < 0
        net.low.mul_(pk.nm_mask(net.low.float().abs(), pk.NM(2, 4)).to(torch.bfloat16))
    return net


def test_round_trip_is_bit_exact_with_signed_zeros_nan_and_ties(tmp_path):
    net = pruned_net()
    with torch.no_grad():
        net.fc1.weight[0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    assert (net.fc1.weight.view(torch.int32) == torch.iinfo(torch.int32).min).any()  # has -0.0
    f = tmp_path / "m.safetensors"
    with pytest.warns(RuntimeWarning, match="NaN"):
        info = save(net, f)
    assert info["encodings"]["conv.weight"] == "unstructured"
    assert info["encodings"]["low"] == "2:4"
    assert info["encodings"]["head.weight"] == "alias"
    state = load(f)
    assert_same_bits(net.state_dict(), state)
    assert state["head.weight"] is state["emb.weight"]
    fresh = Net()
    assert load(f, fresh) is fresh
    assert_same_bits(net.state_dict(), fresh.state_dict())
    assert fresh.head.weight is fresh.emb.weight


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:8"])
def test_nm_conv_and_linear_stored_compactly(tmp_path, pattern):
    torch.manual_seed(1)
    p = pk.parse_pattern(pattern)
    conv, lin = torch.randn(16, 8, 3, 3), torch.randn(32, 64)
    conv = conv * pk.nm_mask(conv.abs(), p)  # groups along the (kernel position, channel) columns
    lin = lin * pk.nm_mask(lin.abs(), p)
    lin[0, : p.m] = 0.0  # a group with fewer than N non-zeros
    info = save({"conv": conv, "lin": lin}, tmp_path / "nm.safetensors")
    assert info["encodings"] == {"conv": pattern, "lin": pattern}
    with safe_open(str(tmp_path / "nm.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["tensors"])
        assert tuple(fh.get_tensor("lin::values").shape) == (32, 64 * p.n // p.m)
    assert meta["conv"]["pattern"] == pattern
    out = load(tmp_path / "nm.safetensors")
    assert_same_bits({"conv": conv, "lin": lin}, out)


def test_dense_and_empty_tensors_stay_plain(tmp_path):
    state = {"w": torch.randn(8, 8), "empty": torch.zeros(0, 4), "zero": torch.zeros(64), "flag": torch.tensor(True),
             "f64": torch.zeros(4, 4, dtype=torch.float64)}
    info = save(state, tmp_path / "d.safetensors")
    assert info["encodings"]["w"] == "dense" and info["encodings"]["empty"] == "dense"
    assert info["encodings"]["zero"] == "unstructured"
    assert_same_bits(state, load(tmp_path / "d.safetensors"))


def test_ninety_percent_is_under_0_15_of_dense(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    targets = list(pk.find_targets(mlp, include_head=True))
    masks = pk.MaskSet({n: pk.unstructured_mask(m.weight.abs(), 0.9) for n, m in pk.find_targets(mlp, include_head=True).items()})
    masks.apply(mlp)  # w * mask: about half the zeros are -0.0, kept exactly
    save_file(dict(mlp.state_dict()), tmp_path / "dense.safetensors")
    dense = os.path.getsize(tmp_path / "dense.safetensors")
    save(mlp, tmp_path / "sparse.safetensors")
    ratio = os.path.getsize(tmp_path / "sparse.safetensors") / dense
    assert ratio <= 0.15, ratio
    assert_same_bits(mlp.state_dict(), load(tmp_path / "sparse.safetensors"))
    assert len(targets) == 3


# -- atomic writes -----------------------------------------------------------------------------
def test_crash_mid_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    f = tmp_path / "m.safetensors"
    old = pruned_net(0)
    save(old, f)
    before = f.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save(pruned_net(1), f)
    monkeypatch.undo()
    assert f.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with pytest.raises(OSError):
        save(old, tmp_path / "no_such_dir" / "m.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]


# -- refusals ----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    f = tmp_path / "m.safetensors"
    save(pruned_net(), f)
    return f


def test_truncated_and_corrupt_files_are_refused(saved, tmp_path):
    data = saved.read_bytes()
    for name, content in [("trunc.st", data[: len(data) // 2]), ("tiny.st", data[:5]), ("junk.st", b"\x00" * 100),
                          ("text.st", b"hello world, not a checkpoint")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load(tmp_path / name)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the last stored tensor
    (tmp_path / "flip.st").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum|corrupt"):
        load(tmp_path / "flip.st")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(tmp_path / "missing.st")
    assert saved.read_bytes() == data


def rewrite_metadata(src, dst, sign=True, **changes):
    """Copy a checkpoint with changed metadata, re-signed (so the inner checks are what refuse it)."""
    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.pop(HEADER_CRC)
    meta.update(changes)
    blob = st_save(tensors, metadata=meta)
    dst.write_bytes(b"".join(_sign_header(blob)) if sign else blob)


def header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_a_flipped_bit_anywhere_in_the_header_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    end = header_length(data)
    assert json.loads(data[8:end])["__metadata__"][HEADER_CRC]
    accepted = []
    for i in range(end):  # the length prefix, the tensor index, the metadata and the padding
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        (tmp_path / "f.st").write_bytes(bytes(flipped))
        try:
            load(tmp_path / "f.st")
            accepted.append(i)
        except CheckpointError:
            pass
    assert accepted == []
    key = data.index(b'"model_class"')  # the case: a renamed metadata key
    renamed = data[:key + 1] + b"M" + data[key + 2:]
    (tmp_path / "r.st").write_bytes(renamed)
    with pytest.raises(CheckpointError, match="header checksum mismatch"):
        load(tmp_path / "r.st")


def test_header_without_checksum_is_refused_unless_version_1(saved, tmp_path):
    rewrite_metadata(saved, tmp_path / "nocrc.st", sign=False)
    with pytest.raises(CheckpointError, match="no checksum"):
        load(tmp_path / "nocrc.st")
    rewrite_metadata(saved, tmp_path / "v1.st", sign=False, version="1")  # as prunekit wrote before
    assert_same_bits(load(tmp_path / "v1.st"), pruned_net().state_dict())


def test_unknown_version_and_plain_safetensors_are_refused(saved, tmp_path):
    rewrite_metadata(saved, tmp_path / "v3.st", version="3")
    with pytest.raises(CheckpointError, match="version '3'"):
        load(tmp_path / "v3.st")
    save_file({"w": torch.zeros(3)}, tmp_path / "plain.st")
    with pytest.raises(CheckpointError, match="not a prunekit checkpoint"):
        load(tmp_path / "plain.st")
    entries = json.loads(safe_open(str(saved), "pt").metadata()["tensors"])
    entries["fc1.weight"]["nnz"] += 1
    rewrite_metadata(saved, tmp_path / "meta.st", tensors=json.dumps(entries))
    with pytest.raises(CheckpointError, match="fc1.weight"):
        load(tmp_path / "meta.st")


def test_wrong_model_shape_or_dtype_is_refused_and_model_unchanged(saved):
    other = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing in file.*0.weight"):
        load(saved, other)
    assert_same_bits(before, other.state_dict())
    wide = Net(width=65)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match="fc1.weight: file \\(64, 32\\)"):
        load(saved, wide)
    assert_same_bits(before, wide.state_dict())
    double = Net().double()
    with pytest.raises(CheckpointError, match="dtype mismatch"):
        load(saved, double)


# -- masks -------------------------------------------------------------------------------------
def test_load_masks_by_module_name(saved):
    net = pruned_net()
    masks = load_masks(saved)
    assert set(masks) == {"conv", "fc1", "fc2"}  # sparse-stored weights ("low" is not a module weight)
    for name in masks:
        assert torch.equal(masks[name], getattr(net, name).weight != 0)
    chosen = load_masks(saved, names=["fc1", "head"])
    assert list(chosen) == ["fc1", "head"] and bool(chosen["head"].all())
    with pytest.raises(CheckpointError, match="no weights"):
        load_masks(saved, names=["nope"])


def test_magnitude_pruner_resumes_from_a_loaded_model(tmp_path):
    def mlp():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = pk.MagnitudePruner(model, opt, 0.75)
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    final = pruner.finalize()
    save(model, tmp_path / "m.safetensors")

    fresh = load(tmp_path / "m.safetensors", mlp())
    loaded = {k: v.clone() for k, v in fresh.state_dict().items()}
    masks = load_masks(tmp_path / "m.safetensors", names=list(pk.find_targets(fresh)))
    assert all(torch.equal(masks[n], final[n]) for n in final)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    resumed = pk.MagnitudePruner(fresh, opt2, 0.75, masks=masks)
    assert_same_bits(loaded, fresh.state_dict())  # building the pruner changed nothing
    for _ in range(5):
        nn.functional.mse_loss(fresh(x), y).backward()
        opt2.step()
        opt2.zero_grad()
        resumed.step()
    assert masks.verify(fresh)  # every loaded zero is still zero
    assert any(not torch.equal(fresh.state_dict()[k], loaded[k]) for k in loaded)  # and it trained
    assert all(torch.equal(resumed.masks()[n], masks[n]) for n in masks)


def test_malformed_metadata_is_refused(saved, tmp_path):
    for i, entries in enumerate([{"fc1.weight": {"enc": "zip"}}, {"a": {"enc": "alias", "of": "b"}},
                                 {"a": {"enc": "dense", "shape": [-1], "dtype": "float32"}}, []]):
        rewrite_metadata(saved, tmp_path / f"bad{i}.st", tensors=json.dumps(entries))
        with pytest.raises(CheckpointError, match="corrupt"):
            load(tmp_path / f"bad{i}.st", Net())
    rewrite_metadata(saved, tmp_path / "badjson.st", tensors="{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_masks(tmp_path / "badjson.st")
