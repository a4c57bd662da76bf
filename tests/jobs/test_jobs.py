"""run_recipe: a whole job end to end, its outputs, and what it leaves after errors and Ctrl-C."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

import prunekit
from prunekit.jobs import load_output, run_recipe
from prunekit.jobs.loading import load_model
from prunekit.jobs.recipe import load_recipe

from helpers.loading_toys import write_job  # noqa: E402


def test_run_recipe_end_to_end(tmp_path):
    outcome = run_recipe(write_job(tmp_path), progress=False)
    out = tmp_path / "out"
    assert outcome.output_dir == str(out)
    assert set(outcome.files) == {"model.safetensors", "model.prunekit.safetensors", "prune_report.json", "layer_sparsity.png",
                                  "prune_report.md", "recipe.yaml"} == set(os.listdir(out))
    assert abs(outcome.result.sparsity - 0.5) < 0.02
    model, _ = load_model("helpers.loading_toys:tiny_mlp", state_dict=str(out / "model.safetensors"))
    w = torch.cat([model[i].weight.flatten() for i in (0, 2, 4)])
    assert abs((w == 0).float().mean().item() - 0.5) < 0.02
    compressed = prunekit.load(out / "model.prunekit.safetensors")
    assert torch.equal(compressed["2.weight"], model[2].weight)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["recipe"]["prune"]["method"] == "wanda" and report["result"]["sparsity"] == outcome.result.sparsity
    assert "total:" in (out / "prune_report.md").read_text()
    assert load_recipe(out / "recipe.yaml") == load_recipe(write_job(tmp_path))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_existing_output_refused_untouched_then_overwritten(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --overwrite / overwrite=True"):
        run_recipe(path, progress=False)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    run_recipe(path, overwrite=True, progress=False)
    assert "keep.txt" not in os.listdir(tmp_path / "out") and "model.safetensors" in os.listdir(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


@pytest.mark.parametrize("where", ["prunekit.oneshot.prune.prune", "prunekit.formats.compact.save"])
def test_interrupt_leaves_no_output_and_no_temp(tmp_path, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(sys.modules[module], name, interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(write_job(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["job.yaml", "x.pt"]


def test_interrupted_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    path = write_job(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    monkeypatch.setattr(prunekit.formats.compact, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(path, overwrite=True, progress=False)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["job.yaml", "out", "x.pt"]


def test_mismatched_data_fails_before_pruning(tmp_path):
    path = write_job(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((8, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="does not fit the model"):
        run_recipe(load_recipe(path).with_overrides(tensors=str(tmp_path / "x.npy")), progress=False)
    assert not (tmp_path / "out").exists()


def test_run_recipe_on_minilm(tmp_path, minilm):
    recipe = load_recipe({"model": "builtin:minilm",
                          "data": {"corpus": "pydoc", "seq_len": 16, "n_sequences": 4, "batch_size": 4},
                          "prune": {"method": "wanda", "sparsity": 0.5},
                          "output": {"dir": str(tmp_path / "mini")}})
    outcome = run_recipe(recipe, progress=False)
    assert {"config.json", "model.safetensors", "model.prunekit.safetensors", "tokenizer.json"} <= set(outcome.files)
    model = prunekit.load_pretrained_compressed(tmp_path / "mini")
    w = model.encoder.layer[0].attention.self.query.weight
    assert abs((w == 0).float().mean().item() - 0.5) < 0.01


def test_load_output_rebuilds_a_factory_model_from_its_recipe_folder(tmp_path, monkeypatch):
    """The factory module lives beside the recipe only; the output and working folders are elsewhere."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "recipe_folder_toy.py").write_text(
        "import torch\n\ndef build(width=4):\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))\n")
    torch.save(torch.randn(32, 8), project / "x.pt")
    recipe = {"model": {"source": "recipe_folder_toy:build", "kwargs": {"width": 6}},
              "data": {"tensors": "x.pt"}, "prune": {"method": "wanda", "sparsity": 0.5},
              "output": {"dir": str(tmp_path / "outputs" / "out"), "formats": ["compressed"]}}
    (project / "job.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    outcome = run_recipe(project / "job.yaml", progress=False)
    monkeypatch.delitem(sys.modules, "recipe_folder_toy")
    model = load_output(outcome.output_dir)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), outcome.model.state_dict().values()))
    assert int((model[0].weight == 0).sum()) == 24  # half of 6 x 8


def test_removed_compressed_tensors_format_is_refused_with_the_alternatives(tmp_path):
    with pytest.raises(ValueError, match="'compressed-tensors' was removed") as err:
        load_recipe(write_job(tmp_path), formats=["hf", "compressed-tensors"])
    assert "transformers 5" in str(err.value) and "'hf'" in str(err.value) and "'compressed'" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_old_output_whose_recipe_lists_compressed_tensors_still_loads(tmp_path):
    outcome = run_recipe(write_job(tmp_path), progress=False)
    out = tmp_path / "out"
    spec = yaml.safe_load((out / "recipe.yaml").read_text())
    spec["output"]["formats"] = ["hf", "compressed-tensors"]  # as prunekit wrote it before the format was removed
    (out / "recipe.yaml").write_text(yaml.safe_dump(spec))
    model = load_output(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), outcome.model.state_dict().values()))


def test_load_output_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither config.json nor recipe.yaml"):
        load_output(tmp_path)
    outcome = run_recipe(load_recipe(write_job(tmp_path), formats=[]), progress=False)
    assert "recipe.yaml" in outcome.files and "model.safetensors" not in outcome.files
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_output(outcome.output_dir)
