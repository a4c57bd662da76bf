"""benchmarks/_vision_common.py: the torch-only helpers shared with vision peers."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")
sys.path.insert(0, BENCH)
import _vision_common as vc  # noqa: E402


def test_imports_torch_only():
    """The zoo loads without prunekit (a peer's venv has torch only)."""
    code = ("import sys; sys.path.insert(0, %r); import _vision_common as vc; m = vc.MODELS['resnet'].build(); "
            "vc.MODELS['mobilenet'].build(); vc.MODELS['vit'].build(); "
            "assert not [k for k in sys.modules if k == 'prunekit' or k.startswith('prunekit.')]; print('ok')" % BENCH)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_macs_hand_computed():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    expected = 4 * 28 * 28 * 9 + 4 * 14 * 14 * 9 + 10 * 4 * 14 * 14
    assert vc.macs(model) == expected


def test_test_accuracy_against_label_count():
    class Constant(nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, 3] = 1
            return out

    _, y = vc.mnist("test")
    assert vc.test_accuracy(Constant(), images=700, batch=300) == pytest.approx(100.0 * float((y[:700] == 3).sum()) / 700)


def test_calibration_subsets():
    a, b, c = vc.calibration(0, 100, 32), vc.calibration(0, 100, 32), vc.calibration(1, 100, 32)
    assert [len(t) for t in a] == [32, 32, 32, 4]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    x, _ = vc.mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(torch.cat(a), x[idx])


def test_fine_tune_is_deterministic_and_learns():
    recipe = vc.FineTune(steps=3, batch=16, lr=0.05)

    def run():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        before = m[1].weight.detach().clone()
        vc.fine_tune(m, recipe)
        return before, m

    b1, m1 = run()
    _, m2 = run()
    assert torch.equal(m1[1].weight, m2[1].weight)
    assert not torch.equal(b1, m1[1].weight)
    assert not m1.training
    # one step by hand: the first 16 images of the fixed permutation
    torch.manual_seed(1)
    m = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    ref.load_state_dict(m.state_dict())
    vc.fine_tune(m, vc.FineTune(steps=1, batch=16, lr=0.05))
    x, y = vc.mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:16]
    nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
    with torch.no_grad():
        expected = ref[1].weight - 0.05 * ref[1].weight.grad
    torch.testing.assert_close(m[1].weight, expected, rtol=1e-5, atol=1e-6)


def test_latency_restores_threads_and_ratio():
    before = torch.get_num_threads()
    small, big = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 64, 3)
    lat = vc.latency(big, small, batch=2, repeats=3, warmup=1, threads=1)
    assert torch.get_num_threads() == before
    assert lat.dense_ms > 0 and lat.pruned_ms > 0
    assert lat.as_dict()["speedup"] == pytest.approx(lat.dense_ms / lat.pruned_ms)


def test_load_trained_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="model must be one of"):
        vc.load_trained("alexnet")
    with pytest.raises(FileNotFoundError, match="structured_vision.py --models resnet"):
        vc.load_trained("resnet")
    torch.manual_seed(0)
    model = vc.MODELS["resnet"].build()
    torch.save(model.state_dict(), vc.cache_path("resnet"))
    loaded = vc.load_trained("resnet")
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


class _Attend(nn.Module):
    """Patchify 28x28 into 16 tokens of 49 pixels, one self-attention, mean, classify."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.embed, self.attn, self.fc = nn.Linear(49, 8), attn, nn.Linear(8, 10)

    def forward(self, x):
        t = self.embed(x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(len(x), 16, 49))
        return self.fc(self.attn(t, t, t, need_weights=False)[0].mean(1))


def test_macs_counts_attention_once_whether_out_proj_is_hooked_or_not():
    from prunekit.structures.mha import PrunedMultiheadAttention

    torch.manual_seed(0)
    model = _Attend(nn.MultiheadAttention(8, 2, batch_first=True))
    t, d = 16, 8
    # embed + q, k, v projections + QK^T and AV + out_proj + fc
    expected = t * 49 * d + 3 * t * d * d + 2 * t * t * d + t * d * d + 10 * d
    assert vc.macs(model) == expected
    drop_in = _Attend(PrunedMultiheadAttention.from_torch(model.attn))  # calls out_proj as a module
    assert vc.macs(drop_in) == expected
    # one head of 4 dimensions left: the projections and products shrink, the embedding stays
    small = _Attend(PrunedMultiheadAttention(8, 1, 4, batch_first=True))
    assert vc.macs(small) == t * 49 * d + 3 * t * d * 4 + 2 * t * t * 4 + t * 4 * d + 10 * d


def test_structured_vision_restates_only_its_own_refusals():
    import structured_vision as sv

    meta = {"models": ["vit"], "refines": ["None", "lstsq"]}
    assert sv.restated("vit", meta) and sv.restated("vit|obs|None", meta) and sv.restated("vit|0.5|l2|lstsq|0", meta)
    assert not sv.restated("vit|l2|snows", meta) and not sv.restated("vit|0.5|l2|snows|1", meta)
    assert not sv.restated("resnet|l2|None", meta)
