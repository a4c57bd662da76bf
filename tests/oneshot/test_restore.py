"""The on-disk restore point of prune() (prunekit.oneshot.runtime.restore)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.runtime.restore import RestorePoint


def test_saved_originals_come_back_on_error_and_the_folder_is_always_removed():
    weights = {"a": torch.randn(3, 4), "b": torch.randn(5, 2).to(torch.bfloat16)}
    originals = {n: w.clone() for n, w in weights.items()}
    with pytest.raises(KeyboardInterrupt):
        with RestorePoint(lambda n, w: weights[n].copy_(w)) as point:
            for name, w in weights.items():
                point.save(name, w)
                w.zero_()
                point.save(name, w)  # a second save of a changed layer keeps the original
            folder = point.folder
            assert sorted(os.listdir(folder)) == ["0.bin", "1.bin"]
            raise KeyboardInterrupt
    assert not os.path.exists(folder)
    for name, w in weights.items():
        assert torch.equal(w, originals[name]) and w.dtype == originals[name].dtype, name


def test_nothing_is_written_back_after_success():
    w = torch.ones(4)
    with RestorePoint(lambda n, t: w.copy_(t)) as point:
        point.save("w", w)
        w.zero_()
        folder = point.folder
    assert not os.path.exists(folder) and not w.any()


def test_a_prune_that_fails_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))  # the head is kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import prunekit.oneshot.pipeline as pipeline

    real = pipeline.Job._write

    def fail_on_second(layer, kind, unit, w, mask):
        if layer is model[2]:
            raise KeyboardInterrupt
        real(layer, kind, unit, w, mask)

    monkeypatch.setattr(pipeline.Job, "_write", staticmethod(fail_on_second))
    with pytest.raises(KeyboardInterrupt):
        pk.prune(model, None, sparsity=0.5, progress=False)
    assert os.listdir(tmp_path) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


_GROWTH = textwrap.dedent("""
    import sys, gc, torch
    from torch import nn
    import prunekit as pk
    from prunekit.zoo.memory import reset_peak, resident_mib
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = int(sys.argv[1])
    model = nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(1024, 1024), nn.ReLU())])
    data = [torch.randn(16, 1024) for _ in range(2)]
    warm = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    pk.prune(warm, data, sparsity=0.5, method="wanda", progress=False)  # warm-up
    gc.collect(); reset_peak(); before = resident_mib("VmRSS")
    pk.prune(model, data, sparsity=0.5, method="wanda", progress=False)
    print(resident_mib("VmHWM") - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_growth_does_not_depend_on_the_number_of_layers():
    """2 vs 8 layers of 4 MiB: an in-memory restore copy would add 24 MiB to the deeper run."""
    # A fixed mmap threshold: glibc's sliding one keeps freed layer-sized blocks in the heap, so
    # the peak would follow the allocation history rather than what is held.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    # both processes at once (each measures its own peak): half the wait on two cores
    runs = {n: subprocess.Popen([sys.executable, "-c", _GROWTH, str(n)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for n in (2, 8)}
    outputs = {n: run.communicate() for n, run in runs.items()}
    assert all(run.returncode == 0 for run in runs.values()), {n: err[-2000:] for n, (_, err) in outputs.items()}
    growth = {n: float(out.split()[-1]) for n, (out, _) in outputs.items()}
    assert growth[8] - growth[2] < 8, growth
