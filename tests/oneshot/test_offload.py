"""Models dispatched with accelerate (prunekit.oneshot.runtime.offload): pruned where they are kept."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.runtime.offload import Storage, align_hook, home_device, is_dispatched

accelerate = pytest.importorskip("accelerate")


def _mlp(dtype=torch.float32, blocks=3, width=64):
    torch.manual_seed(0)
    body = [nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)) for _ in range(blocks)]
    return nn.Sequential(*body, nn.Linear(width, 10)).eval().to(dtype)


def _data(dtype=torch.float32, width=64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, width, generator=g).to(dtype) for _ in range(3)]


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear weight as the model keeps it (an offloaded one from its offload storage)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = align_hook(m).weights_map["weight"] if m.weight.is_meta else m.weight.detach()
    return out


def _dispatch(model, how, folder):
    if how == "disk_offload":
        return accelerate.disk_offload(model, str(folder), execution_device="cpu")
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    return accelerate.dispatch_model(model, device_map={"0": "cpu", "1": "disk", "2": "disk", "3": "cpu"},
                                     main_device="cpu", offload_dir=str(folder))


@pytest.mark.parametrize("how", ["disk_offload", "cpu_offload", "dispatch_model"])
@pytest.mark.parametrize("method,refine", [("sparsegpt", None), ("magnitude", None), ("wanda", "lstsq"),
                                           ("magnitude", "snows")])
def test_an_offloaded_model_prunes_to_exactly_the_in_memory_weights(how, method, refine, tmp_path):
    kw = dict(sparsity=0.5, method=method, refine=refine, progress=False,
              refine_options={"k": 2, "max_cg": 3} if refine == "snows" else None)
    memory = _mlp()
    pk.prune(memory, _data(), **kw)
    model = _dispatch(_mlp(), how, tmp_path)
    offloaded = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_meta]
    assert len(offloaded) == (7 if how != "dispatch_model" else 4)  # 6 layers + the head, or blocks 1 and 2
    result = pk.prune(model, _data(), **kw)
    assert len(result.layers) == 6
    expected = {n: w for n, w in memory.state_dict().items()}
    for name, w in _stored(model).items():
        assert torch.equal(w, expected[name + ".weight"]), name
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_meta] == offloaded
    assert all(align_hook(m).offload for n, m in model.named_modules() if n in offloaded)  # hooks as they were
    if how == "disk_offload":  # the pruned weights are in the offload folder itself
        fresh = accelerate.utils.OffloadedWeightsLoader(save_folder=str(tmp_path))
        assert torch.equal(fresh["1.2.weight"], expected["1.2.weight"])


def test_a_bf16_model_on_disk_prunes_like_in_memory(tmp_path):
    memory = _mlp(torch.bfloat16)
    pk.prune(memory, _data(torch.bfloat16), sparsity=0.5, method="sparsegpt", progress=False)
    model = _dispatch(_mlp(torch.bfloat16), "dispatch_model", tmp_path)
    pk.prune(model, _data(torch.bfloat16), sparsity=0.5, method="sparsegpt", progress=False)
    for name, w in _stored(model).items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, memory.state_dict()[name + ".weight"]), name


def test_a_disk_offloaded_llama_prunes_like_in_memory(tmp_path):
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    calib = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    memory = tiny_llama(2)
    pk.prune(memory, calib, pattern="2:4", method="sparsegpt", progress=False)
    model = accelerate.disk_offload(tiny_llama(2), str(tmp_path), execution_device="cpu")
    assert is_dispatched(model) and home_device(model) == torch.device("cpu")
    result = pk.prune(model, calib, pattern="2:4", method="sparsegpt", progress=False)
    assert result.sparsity == 0.5 and len(result.layers) == 14
    storage = Storage(model, {r.name: model.get_submodule(r.name) for r in result.layers})
    for r in result.layers:
        assert torch.equal(storage.read(f"{r.name}.weight"), memory.get_submodule(r.name).weight), r.name


def test_a_failure_midway_leaves_the_offload_storage_as_it_was(tmp_path, monkeypatch):
    import prunekit.oneshot.pipeline as pipeline

    model = _dispatch(_mlp(), "disk_offload", tmp_path)
    before = {n: w.clone() for n, w in _stored(model).items()}
    real, seen = pipeline.Job.prune_layer, []

    def flaky(self, name, stats, **ctx):
        seen.append(name)
        if len(seen) == 4:  # two blocks written back to disk, the third half done
            raise KeyboardInterrupt
        return real(self, name, stats, **ctx)

    monkeypatch.setattr(pipeline.Job, "prune_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        pk.prune(model, _data(), sparsity=0.5, method="sparsegpt", progress=False)
    after = _stored(model)
    assert all(torch.equal(after[n], w) for n, w in before.items())
    assert all(m.weight.is_meta and align_hook(m).offload for m in model.modules() if isinstance(m, nn.Linear))


_PEAK = textwrap.dedent("""
    import gc, sys, tempfile, torch
    from torch import nn
    import accelerate, prunekit as pk
    from prunekit.zoo.memory import reset_peak, resident_mib
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)) for _ in range(32)]
    model = nn.Sequential(*blocks, nn.Linear(512, 8)).eval()
    size = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    data = [torch.randn(16, 512) for _ in range(2)]
    model = accelerate.disk_offload(model, tempfile.mkdtemp(), execution_device="cpu")
    warm = accelerate.disk_offload(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), tempfile.mkdtemp(),
                                   execution_device="cpu")  # imports and allocator warmed up outside the measure
    pk.prune(warm, [torch.randn(2, 4)], pattern="2:4", method="wanda", include_head=True, progress=False)
    del blocks, warm; gc.collect(); reset_peak(); before = resident_mib("VmRSS")
    result = pk.prune(model, data, pattern="2:4", method="wanda", progress=False)
    print(size, resident_mib("VmHWM") - before, result.sparsity)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_of_a_disk_offloaded_prune_stays_near_one_block():
    """A 64 MiB model on disk, pruned by a process whose peak may grow by 24 MiB only: one 2 MiB
    block, a layer's float64 working copies and the activations (16 MiB measured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # see test_restore.py
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, env=env, check=True)
    size, growth, sparsity = map(float, out.stdout.split()[-3:])
    assert size > 64 and sparsity == 0.5
    assert growth < 24, (size, growth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["disk_offload", "cpu_offload"])
def test_an_offloaded_model_prunes_on_the_gpu_like_in_cpu_memory(how, tmp_path):
    """The model stays on the CPU / disk, the work runs on the GPU; same counts, near weights."""
    kw = dict(sparsity=0.5, method="sparsegpt", refine="snows", refine_options={"k": 2, "max_cg": 3},
              stats_dtype="float64", progress=False)
    memory = _mlp()
    pk.prune(memory, _data(), **kw)
    model = _dispatch(_mlp(), how, tmp_path)
    result = pk.prune(model, _data(), device="cuda", **kw)
    assert result.device.startswith("cuda") and result.peak_device_mib > 0
    assert all(p.device.type in ("meta", "cpu") for p in model.parameters())
    for name, w in _stored(model).items():
        ref = memory.state_dict()[name + ".weight"]
        assert w.device.type == "cpu" and int((w == 0).sum()) == int((ref == 0).sum()), name
        assert torch.allclose(w, ref, rtol=1e-3, atol=1e-4), name


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0]


class _AttentionNet(nn.Module):
    """Two blocks holding nn.MultiheadAttention (four units each) and a grouped conv, then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Attention() for _ in range(2))
        self.mix = nn.Conv1d(16, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.mix(x.transpose(1, 2)).transpose(1, 2))


def test_an_offloaded_multi_matrix_model_prunes_like_in_memory(tmp_path):
    # accelerate loads an offloaded module's weights when its own forward runs; attention's out_proj
    # never runs (it is read functionally), so a model with offloaded attention cannot run at all
    # (accelerate 1.15): the attentions stay in memory, the grouped conv (two matrices) is on disk.
    data = [torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    memory = _AttentionNet().eval()
    kw = dict(sparsity=0.5, method="sparsegpt", progress=False)
    expected = pk.prune(memory, data, **kw)
    model = accelerate.dispatch_model(_AttentionNet().eval(), main_device="cpu", offload_dir=str(tmp_path),
                                      device_map={"blocks": "cpu", "mix": "disk", "head": "cpu"})
    assert model.mix.weight.is_meta
    result = pk.prune(model, data, **kw)
    assert [r.name for r in result.layers] == [r.name for r in expected.layers] and len(result.layers) == 10
    storage = Storage(model, {n: model.get_submodule(n) for n in ("blocks.0.attn", "blocks.1.attn", "mix")})
    assert sorted(storage.offloaded) == ["mix.weight"]
    for path in storage.params:
        assert torch.equal(storage.read(path), memory.get_parameter(path)), path
