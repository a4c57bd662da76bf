"""End to end on a real pretrained transformer: all-MiniLM-L6-v2 (22.7M parameters), offline."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.zoo.text import pydoc_text, split_text  # noqa: E402


@pytest.fixture(scope="module")
def setup(minilm):
    tok, model = minilm
    calib_text, eval_text = split_text(pydoc_text())
    ids = tok(calib_text[:60000], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    seqs = ids[: 16 * 64].view(16, 64)
    calibration = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in seqs.split(8)]
    sentences = [s.strip() for s in eval_text.split(".") if len(s.split()) > 6][:32]
    held_out = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return model, calibration, held_out


def embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("method,pattern,sparsity,min_cos", [
    ("wanda", "unstructured", 0.5, 0.82), ("sparsegpt", "2:4", None, 0.78)])
def test_minilm_prunes_end_to_end(setup, method, pattern, sparsity, min_cos):
    dense, calibration, held_out = setup
    model = copy.deepcopy(dense)
    keys = list(model.state_dict())
    result = pk.prune(model, calibration, sparsity=sparsity, pattern=pattern, method=method, progress=False)
    assert list(model.state_dict()) == keys
    linears = [n for n in result.layers if n.name.startswith("encoder.layer.")]
    assert len(linears) == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
    assert all(abs(r.sparsity - 0.5) < 1e-3 for r in linears)
    assert torch.equal(model.embeddings.word_embeddings.weight, dense.embeddings.word_embeddings.weight)
    cos = (embed(model, held_out) * embed(dense, held_out)).sum(-1)
    print(f"{method} {pattern}: mean cosine similarity to dense embeddings {cos.mean():.4f}")
    assert cos.mean() > min_cos
