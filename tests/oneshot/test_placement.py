"""Execution device and statistics precision of one-shot pruning (prunekit.oneshot.runtime.placement).

The CUDA tests run only where a GPU is present (the lent GPU machine, via benchmarks/gpu.py's
test step); everywhere else they skip.
"""
import copy
import os
import sys

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.runtime.placement import execution_device, stats_precision, to_block_device
from prunekit.zoo.models import resnet_mnist

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _model(seed=0):
    torch.manual_seed(seed)
    return resnet_mnist(width=8, blocks_per_stage=1).eval()


def _data(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(n)]


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.skipif(CUDA, reason="checks the error where no GPU exists")
def test_cuda_without_a_gpu_is_a_clear_error_and_the_model_is_untouched():
    model = _model()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        pk.prune(model, _data(), sparsity=0.5, method="sparsegpt", device="cuda")
    assert _same(model, before)


@pytest.mark.parametrize("bad", ["gpu0", "meta", 3.5])
def test_bad_devices_are_refused(bad):
    with pytest.raises(ValueError, match="device"):
        execution_device(bad)


def test_explicit_cpu_device_is_the_default_run_bit_for_bit():
    a, b = _model(), _model()
    ra = pk.prune(a, _data(), sparsity=0.6, method="sparsegpt", progress=False)
    rb = pk.prune(b, _data(), sparsity=0.6, method="sparsegpt", device="cpu", progress=False)
    assert _same(a, b)
    assert ra.device == rb.device == "cpu" and ra.stats_dtype == "float32"
    assert ra.peak_device_mib is None  # the CPU's peak is not tracked by PyTorch


def test_stats_precision_defaults_and_errors():
    assert stats_precision(None) == torch.float32
    assert stats_precision(None, torch.float16) == torch.float32
    assert stats_precision(None, torch.float64) == torch.float64  # a float64 model keeps float64
    assert stats_precision("float64") == torch.float64
    assert stats_precision(torch.float32, torch.float64) == torch.float32
    with pytest.raises(ValueError, match="stats_dtype"):
        stats_precision("float16")
    with pytest.raises(ValueError, match="stats_dtype"):
        stats_precision(torch.bfloat16)


@pytest.mark.parametrize("method,refine", [("sparsegpt", None), ("wanda", "lstsq")])
def test_float32_statistics_give_the_same_counts_and_nearly_the_same_weights(method, refine):
    a, b = _model(), _model()
    # float64 against float32 (the default): without stats_dtype both runs would be float32
    pk.prune(a, _data(), sparsity=0.6, method=method, refine=refine, stats_dtype="float64", progress=False)
    r = pk.prune(b, _data(), sparsity=0.6, method=method, refine=refine, stats_dtype="float32", progress=False)
    assert r.stats_dtype == "float32"
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert int((pa == 0).sum()) == int((pb == 0).sum()), name
        assert torch.allclose(pa, pb, rtol=1e-3, atol=1e-4), name


class _Recorder(nn.Linear):
    """A layer that records where it is sent instead of moving (no second device here)."""

    def __init__(self):
        super().__init__(4, 4)
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_blocks_go_back_home_when_pruning_fails():
    layer = _Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        with to_block_device([layer], torch.device("cuda", 0), torch.device("cpu")):
            raise RuntimeError("boom")
    assert layer.moves == ["cuda:0", "cpu"]
    with to_block_device([layer], torch.device("cpu"), torch.device("cpu")):
        pass
    assert layer.moves == ["cuda:0", "cpu"]  # same device: nothing moves


def test_a_meta_model_is_refused_with_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="meta device"):
        pk.prune(model, None, sparsity=0.5)


@needs_cuda
@pytest.mark.parametrize("method,refine", [("magnitude", None), ("wanda", None), ("sparsegpt", None),
                                           ("sparsegpt", "lstsq"), ("magnitude", "snows")])
def test_cuda_execution_keeps_the_model_home_and_matches_the_cpu_run(method, refine):
    cpu, off = _model(), _model()
    kw = dict(sparsity=0.6, method=method, refine=refine, progress=False, snows={"k": 2, "max_cg": 5},
              stats_dtype="float64")
    pk.prune(cpu, _data(), **kw)
    result = pk.prune(off, _data(), device="cuda", **kw)
    assert all(p.device.type == "cpu" for p in off.parameters())
    assert result.peak_device_mib is not None and result.peak_device_mib > 0
    for (name, pa), pb in zip(cpu.named_parameters(), off.parameters()):
        assert int((pa == 0).sum()) == int((pb == 0).sum()), name
        assert torch.allclose(pa, pb, rtol=1e-3, atol=1e-3), name


@needs_cuda
def test_a_model_on_the_gpu_prunes_there_with_float32_statistics():
    from helpers.llama_toys import tiny_llama

    model = tiny_llama(num_layers=2).cuda()
    ids = [{"input_ids": torch.randint(0, 100, (4, 16))} for _ in range(3)]  # batches on the CPU are fine
    result = pk.prune(model, ids, pattern="2:4", method="sparsegpt", progress=False)
    assert result.stats_dtype == "float32" and result.device.startswith("cuda")
    assert all(p.is_cuda for p in model.parameters())
    assert result.sparsity == 0.5


def test_exact_float32_is_a_no_op_on_the_cpu_and_restores_cuda_flags():
    from prunekit.oneshot.runtime.placement import exact_float32

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with exact_float32(torch.device("cpu")):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == old
    with pytest.raises(RuntimeError):
        with exact_float32(torch.device("cuda")):  # only flags are set: this runs without a GPU too
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise RuntimeError("boom")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == old


# -- half precision -----------------------------------------------------------------------------
HALF_RUNS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("wanda", "lstsq"), ("sparsegpt", "lstsq"),
             ("magnitude", "snows")]


def test_float32_working_copy_keeps_the_parameters_and_rounds_back_once():
    from prunekit.oneshot.runtime.placement import float32_working_copy

    layer = nn.Linear(4, 4).to(torch.bfloat16)
    weight, before = layer.weight, layer.weight.detach().clone()
    with float32_working_copy([layer], {"w": before}) as dense:
        assert layer.weight is weight and weight.dtype == torch.float32 and dense["w"].dtype == torch.float32
        assert torch.equal(weight.detach(), before.float())
        with torch.no_grad():
            weight.add_(1e-4)  # below bfloat16's resolution near these values
    assert weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(weight.detach(), (before.float() + 1e-4).to(torch.bfloat16))


def _llama_calibration(n=3, shape=(4, 32)):
    return [{"input_ids": torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(i))} for i in range(n)]


@pytest.mark.parametrize("method,refine", HALF_RUNS)
def test_every_method_prunes_a_bf16_llama_without_converting_it(method, refine):
    """Weights stay bfloat16 throughout (at most the block and the one SNOWS reads into are
    held in float32), exact per-layer counts, and magnitude's masks equal a float32 run's."""
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    model = tiny_llama(num_layers=3).to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    layers = model.model.layers
    most_in_float32 = []
    watch = [m.register_forward_hook(lambda *_: most_in_float32.append(
        sum(l.self_attn.q_proj.weight.dtype == torch.float32 for l in layers))) for m in model.modules()
             if isinstance(m, nn.Linear)]
    kw = dict(sparsity=0.5, method=method, refine=refine, progress=False,
              refine_options={"k": 1, "max_cg": 2} if refine == "snows" else None)
    result = pk.prune(model, _llama_calibration(2, (2, 16)), **kw)
    for h in watch:
        h.remove()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert max(most_in_float32, default=0) == (2 if refine == "snows" else 0)
    assert len(result.layers) == 21 and all(r.sparsity == 0.5 for r in result.layers)
    pk.prune(reference, _llama_calibration(2, (2, 16)), **kw)
    for r in result.layers:
        ours, theirs = model.get_submodule(r.name).weight, reference.get_submodule(r.name).weight
        if method == "magnitude" and refine is None:
            assert torch.equal(ours == 0, theirs == 0), r.name
        else:  # another rounding of the activations moves a few ties only
            assert float(((ours == 0) == (theirs == 0)).float().mean()) > 0.9, r.name


@pytest.mark.parametrize("method,refine", HALF_RUNS)
def test_every_method_prunes_an_fp16_cnn_in_fp16(method, refine):
    model = _model().half()
    result = pk.prune(model, [x.half() for x in _data()], sparsity=0.5, method=method, refine=refine,
                      progress=False, refine_options={"k": 2, "max_cg": 3} if refine == "snows" else None)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert all(r.sparsity == 0.5 for r in result.layers) and len(result.layers) == 9
    if method == "magnitude" and refine is None:
        reference = _model().half().float()
        pk.prune(reference, None, sparsity=0.5, progress=False)
        for r in result.layers:
            assert torch.equal(model.get_submodule(r.name).weight == 0, reference.get_submodule(r.name).weight == 0)


def test_snows_refits_a_half_model_as_well_as_a_float32_one():
    """Newton-CG on a float32 working copy: without it, float16's rounding left the lookahead
    loss of this model at 0.985 of its start, against 0.862 in float32."""
    pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    ratios = {}
    for dtype in (torch.float32, torch.float16):
        result = pk.prune(tiny_llama(num_layers=2).to(dtype), _llama_calibration(), sparsity=0.5, refine="snows",
                          refine_options={"k": 2, "max_cg": 10, "warm_start": "none"}, progress=False)
        ratios[dtype] = [r.lookahead_after / r.lookahead_before for r in result.layers]
    assert max(abs(a - b) for a, b in zip(ratios[torch.float32], ratios[torch.float16])) < 0.01, ratios


@needs_cuda
@pytest.mark.parametrize("method,refine", HALF_RUNS)
def test_a_bf16_llama_prunes_on_the_gpu_in_bf16(method, refine):
    from helpers.llama_toys import tiny_llama

    model = tiny_llama(num_layers=2).to(torch.bfloat16)
    result = pk.prune(model, _llama_calibration(2, (2, 16)), sparsity=0.5, method=method, refine=refine,
                      device="cuda", progress=False, refine_options={"k": 1, "max_cg": 2} if refine == "snows" else None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(r.sparsity == 0.5 for r in result.layers) and len(result.layers) == 14
