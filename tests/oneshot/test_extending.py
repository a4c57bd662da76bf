"""The proof that a method is one small class: a scoring rule and a refit defined here, used
from pk.prune, a recipe and `prunekit prune --plugin` without touching the library.

The two classes are the code shown in docs/extending.md.
"""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import nn

import prunekit as pk
from prunekit.oneshot.registry import LayerProblem, Method, Refine, Update, register, unregister
from prunekit.sparsity.patterns import NM, nm_mask, unstructured_mask

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the user's code -------------------------------------------------------------------------
@register
class OBD(Method):
    """Optimal Brain Damage's saliency |W_ij|^2 * H_jj (LeCun et al. 1990), per layer."""

    name = "obd"
    needs = frozenset({"hessian"})
    summary = "OBD saliency |W|^2 diag(H)"

    def choose(self, problem: LayerProblem) -> Update:
        w = problem.weight
        scores = w.square() * problem.stats.hessian.diagonal()
        if isinstance(problem.pattern, NM):
            mask = nm_mask(scores, problem.pattern)
        else:
            mask = unstructured_mask(scores, problem.sparsity)
        return Update(w * mask, mask)


@dataclass(frozen=True)
class RescaleOptions:
    max_scale: float = 2.0

    def __post_init__(self):
        if not self.max_scale >= 1.0:
            raise ValueError(f"max_scale must be >= 1, got {self.max_scale}")


@register
class Rescale(Refine):
    """Scale each row's kept weights so its output energy w^T H w matches the dense row's."""

    name = "rescale"
    needs = frozenset({"hessian"})
    Options = RescaleOptions
    summary = "per-row output energy matched to the dense row"

    def refine(self, problem: LayerProblem, chosen: Update) -> Update:
        h, w0, w = problem.stats.hessian, problem.weight, chosen.weight
        dense, kept = ((w0 @ h) * w0).sum(1), ((w @ h) * w).sum(1)
        scale = (dense / kept.clamp_min(1e-12)).sqrt().clamp(1.0, self.options.max_scale)
        return Update(w * scale.unsqueeze(1))
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _leave_the_registry_as_found():
    yield
    unregister("obd")
    unregister("rescale")


def tiny_mlp() -> nn.Module:
    """The model the command line builds (``test_extending:tiny_mlp``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _data():
    return torch.randn(64, 8, generator=torch.Generator().manual_seed(0))


def test_from_python_exact_counts_and_the_rule_is_used():
    model = tiny_mlp()
    x = _data()
    h = x.double().T @ x.double() / len(x)  # the first layer's Hessian
    w0 = model[0].weight.detach().double().clone()
    result = pk.prune(model, list(x.split(16)), sparsity=0.5, method="obd", refine="rescale",
                      refine_options={"max_scale": 1.5}, progress=False)
    assert [r.name for r in result.layers] == ["0", "2"]
    assert [int((model[i].weight == 0).sum()) for i in (0, 2)] == [64, 128]
    keep = unstructured_mask(w0.square() * h.diagonal(), 0.5)
    assert torch.equal(model[0].weight != 0, keep)
    scale = model[0].weight.double()[keep] / w0[keep]
    assert (scale >= 1 - 1e-6).all() and (scale <= 1.5 + 1e-6).all() and (scale > 1 + 1e-3).any()
    assert all(r.error_refined is not None for r in result.layers)


def test_options_are_checked_and_the_model_left_alone():
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rescale option max_scale must be >= 1"):
        pk.prune(model, [_data()], sparsity=0.5, method="obd", refine="rescale", refine_options={"max_scale": 0.5})
    with pytest.raises(ValueError, match="unknown rescale option 'max_scal'; did you mean 'max_scale'"):
        pk.prune(model, [_data()], sparsity=0.5, method="obd", refine="rescale", refine_options={"max_scal": 2})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_from_a_recipe(tmp_path):
    torch.save(_data(), tmp_path / "x.pt")
    outcome = pk.run_recipe({
        "model": "test_extending:tiny_mlp",
        "data": {"tensors": str(tmp_path / "x.pt"), "batch_size": 16},
        "prune": {"method": "obd", "refine": "rescale", "refine_options": {"max_scale": 1.2}, "pattern": "2:4",
                  "plugins": ["test_extending"]},
        "output": {"dir": str(tmp_path / "out"), "formats": ["compressed"]},
    }, progress=False)
    assert outcome.result.method == "obd" and outcome.result.refine == "rescale"
    weights = pk.load(tmp_path / "out" / "model.prunekit.safetensors")
    assert pk.check_nm(weights["0.weight"] != 0, NM(2, 4)) and int((weights["0.weight"] == 0).sum()) == 64


def test_from_the_command_line_in_a_fresh_process(tmp_path):
    """`prunekit prune --plugin test_extending`: the plugin is imported before the recipe is read."""
    torch.save(_data(), tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "prunekit.cli", "prune", "test_extending:tiny_mlp", "--plugin", "test_extending",
         "--method", "obd", "--refine", "rescale", "--refine-option", "max_scale=1.2", "--sparsity", "0.75",
         "--data-tensors", str(tmp_path / "x.pt"), "--batch-size", "16", "--format", "compressed",
         "-o", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    spec = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert spec["prune"]["method"] == "obd" and spec["prune"]["refine_options"] == {"max_scale": 1.2}
    weights = pk.load(tmp_path / "out" / "model.prunekit.safetensors")
    assert [int((weights[f"{i}.weight"] == 0).sum()) for i in (0, 2)] == [96, 192]
