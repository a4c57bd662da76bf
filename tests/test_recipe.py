import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

import prunekit
from prunekit.loading import load_model
from prunekit.recipe import Recipe, list_recipes, load_recipe, recipe_path, run_recipe

sys.path.insert(0, os.path.dirname(__file__))


def write_job(tmp_path, **prune):
    """A recipe file for the tiny MLP with tensor data, next to its data; returns its path."""
    torch.save(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), tmp_path / "x.pt")
    spec = {"model": "loading_toys:tiny_mlp",
            "data": {"tensors": "x.pt", "batch_size": 16},
            "targets": {"include_head": True},
            "prune": {"method": "wanda", "sparsity": 0.5, **prune},
            "output": {"dir": "out", "formats": ["hf", "compressed"]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipes_validate(name):
    recipe = load_recipe(recipe_path(name))
    assert isinstance(recipe, Recipe) and load_recipe(name) == recipe
    assert not os.path.isabs(recipe.output.dir)  # shipped recipes write into the working folder


def test_at_least_the_documented_recipes_ship():
    assert {"minilm-wanda-50", "llm-sparsegpt-50", "cnn-magnitude-snows-90"} <= set(list_recipes())
    with pytest.raises(ValueError, match="did you mean 'minilm-wanda-50'"):
        recipe_path("minilm-wanda-5O")


@pytest.mark.parametrize("raw,message", [
    ({"model": "m", "prune": {"sparsty": 0.5}}, "unknown key 'sparsty' in prune; did you mean 'sparsity'?"),
    ({"model": "m", "prune": {"sparsity": 0.5}, "ouptut": {}}, "unknown key 'ouptut' in the recipe; did you mean 'output'?"),
    ({"model": "m", "prune": {"sparsity": "half"}}, r"prune.sparsity must be a number or null, got 'half'"),
    ({"model": "m", "prune": {"sparsity": 0.5}, "output": {"overwrite": "yes"}}, "output.overwrite must be true or false"),
    ({"model": "m", "data": {"corpus": "pydoc"}, "prune": {"method": "wandda", "sparsity": 0.5}},
     "prune.method must be one of magnitude, wanda, sparsegpt, got 'wandda'; did you mean 'wanda'"),
    ({"model": "m", "prune": {"sparsity": 0.5, "budget": "globl"}}, "did you mean 'global'"),
    ({"model": "m", "prune": {"pattern": "2-4"}}, "pattern must be 'unstructured' or 'N:M'"),
    ({"model": "m", "prune": {"pattern": "1:4", "sparsity": 0.5}}, "contradicts prune.pattern 1:4"),
    ({"model": "m", "prune": {"method": "magnitude"}}, "prune.sparsity is required"),
    ({"model": "m", "prune": {"method": "sparsegpt", "sparsity": 0.5}}, "needs calibration data"),
    ({"model": "m", "data": {"text": ["a"], "tensors": "x.pt"}, "prune": {"sparsity": 0.5}}, "exactly one of"),
    ({"model": "m", "prune": {"method": "magnitude", "sparsity": 0.5}, "output": {"formats": ["hf", "gguf"]}}, "output.formats must be one of"),
    ({"prune": {"sparsity": 0.5}}, "has no model"),
])
def test_invalid_recipes_are_explained(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_recipe(raw)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nprune: {sparsity: 0.5\noutput: x\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_recipe(path)


def test_paths_are_the_recipe_folders_and_overrides(tmp_path, monkeypatch):
    recipe = load_recipe(write_job(tmp_path))
    assert recipe.data.tensors == str(tmp_path / "x.pt") and recipe.output.dir == str(tmp_path / "out")
    monkeypatch.chdir(tmp_path.parent)
    changed = recipe.with_overrides(sparsity=0.75, method="magnitude", dir="elsewhere", refine=None)
    assert changed.prune.sparsity == 0.75 and changed.prune.method == "magnitude"
    assert changed.output.dir == str(tmp_path.parent / "elsewhere")  # the command line's folder
    assert recipe.prune.sparsity == 0.5  # the original is untouched
    with pytest.raises(ValueError, match="unknown key 'sparsty'"):
        recipe.with_overrides(sparsty=0.6)
    with pytest.raises(ValueError, match="prune.sparsity must be"):
        recipe.with_overrides(sparsity="x")


def test_run_recipe_end_to_end(tmp_path):
    outcome = run_recipe(write_job(tmp_path), progress=False)
    out = tmp_path / "out"
    assert outcome.output_dir == str(out)
    assert set(outcome.files) == {"model.safetensors", "model.prunekit.safetensors", "prune_report.json", "layer_sparsity.png",
                                  "prune_report.md", "recipe.yaml"} == set(os.listdir(out))
    assert abs(outcome.result.sparsity - 0.5) < 0.02
    model, _ = load_model("loading_toys:tiny_mlp", state_dict=str(out / "model.safetensors"))
    w = torch.cat([model[i].weight.flatten() for i in (0, 2, 4)])
    assert abs((w == 0).float().mean().item() - 0.5) < 0.02
    compressed = prunekit.load(out / "model.prunekit.safetensors")
    assert torch.equal(compressed["2.weight"], model[2].weight)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["recipe"]["prune"]["method"] == "wanda" and report["result"]["sparsity"] == outcome.result.sparsity
    assert "total:" in (out / "prune_report.md").read_text()
    assert load_recipe(out / "recipe.yaml") == load_recipe(write_job(tmp_path))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's 0700


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


@pytest.mark.parametrize("where", ["prunekit.prune", "prunekit.export.save"])
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
    monkeypatch.setattr(prunekit.export, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
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
