"""transformers' Conv1D (GPT-2): a transposed layer kind, pruned by every method."""
import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from prunekit.layers.base import kind_of  # noqa: E402


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _calibration():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(3)]


def _conv1ds(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}


def test_the_matrix_is_the_transposed_weight():
    layer = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs: weight [8, 6]
    kind = kind_of(layer)
    x = torch.randn(3, 5, 8)
    assert kind.name == "hf-conv1d" and tuple(kind.matrix(layer).shape) == (6, 8)
    out = kind.input_columns(layer, (x,)) @ kind.matrix(layer).T + layer.bias
    assert torch.allclose(out, layer(x).reshape(-1, 6), atol=1e-6)


RUNS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("magnitude", "lstsq"), ("sparsegpt", "snows")]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method,refine", RUNS)
def test_gpt2_prunes_every_conv1d_exactly(method, refine, pattern):
    model = _gpt2()
    layers = _conv1ds(model)
    assert len(layers) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    opts = {"k": 1, "max_cg": 2, "max_steps": 1} if refine == "snows" else None
    result = pk.prune(model, _calibration(), sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                      method=method, refine=refine, refine_options=opts, progress=False)
    assert sorted(r.name for r in result.layers) == sorted(layers)
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert int((w == 0).sum()) == w.numel() // 2, name
        if pattern == "2:4":  # groups of 4 consecutive inputs: the rows of the stored [d_in, d_out] weight
            groups = w.T.reshape(w.shape[1], -1, 4)
            assert int((groups != 0).sum(-1).max()) <= 2, name
    assert torch.isfinite(model(**_calibration()[0]).logits).all()


def test_round_trip_through_save_pretrained(tmp_path):
    model = _gpt2()
    pk.prune(model, _calibration(), pattern="2:4", method="sparsegpt", progress=False)
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == set(model.state_dict())
    ids = _calibration()[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_model_report_counts_conv1d_weights():
    model = _gpt2()
    layers = _conv1ds(model)
    before = pk.model_report(model)
    assert before.params == sum(m.weight.numel() for m in layers.values())  # the tied LM head is the embedding
    pk.prune(model, None, sparsity=0.5, progress=False)
    report = pk.model_report(model)
    assert report.nonzeros == before.params - sum(m.weight.numel() // 2 for m in layers.values())
    mlp = next(s for s in report.layers if s.name == "transformer.h.0.mlp.c_fc")
    assert mlp.kind == "Conv1D" and mlp.flops_dense == 2 * 32 * 128


def test_prunekit_imports_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import prunekit.layers.base as lk, prunekit as pk\n"
            "print(','.join(k.name for k in lk.kinds()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "linear,conv,attention,fused-experts"  # fused experts: matched by layout
