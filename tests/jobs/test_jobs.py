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


def test_a_structured_recipe_runs_prune_structured_and_saves_the_smaller_model(tmp_path):
    """The runner gives the same model as prune_structured called directly on the same data."""
    from safetensors.torch import load_file

    from helpers.loading_toys import mlp_block, write_structured_job

    outcome = run_recipe(write_structured_job(tmp_path, method="flap"), progress=False)
    out = tmp_path / "out"
    assert set(outcome.files) == {"model.safetensors", "prune_report.json", "prune_report.md", "recipe.yaml"}
    assert isinstance(outcome.result, prunekit.structures.StructuredResult)
    direct = mlp_block()
    x = torch.load(tmp_path / "x.pt")
    prunekit.prune_structured(direct, list(x.split(16)), structures="mlp", ratio=0.5, method="flap", progress=False)
    assert outcome.model[1][0].out_features == direct[1][0].out_features == 8
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == direct.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in direct.state_dict().items())
    report = json.loads((out / "prune_report.json").read_text())
    assert report["recipe"]["structured"]["method"] == "flap" and "prune" not in report["recipe"]
    assert report["result"]["params_after"] == sum(p.numel() for p in direct.parameters())
    assert report["result"]["removed_fraction"] == outcome.result.removed_fraction > 0
    assert "parameters" in (out / "prune_report.md").read_text()
    assert load_recipe(out / "recipe.yaml") == load_recipe(write_structured_job(tmp_path, method="flap"))


def test_a_structured_hugging_face_model_reloads_with_plain_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from helpers.llama_toys import tiny_llama

    tiny_llama(2).save_pretrained(tmp_path / "llama")
    torch.save(torch.randint(0, 100, (16, 24), generator=torch.Generator().manual_seed(0)), tmp_path / "ids.pt")
    recipe = {"model": str(tmp_path / "llama"), "data": {"tensors": str(tmp_path / "ids.pt"), "batch_size": 4},
              "structured": {"structures": ["mlp", "heads"], "ratio": 0.5},
              "output": {"dir": str(tmp_path / "out"), "formats": ["hf"]}}
    outcome = run_recipe(recipe, progress=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (back.config.intermediate_size, back.config.num_attention_heads) == (64, 2)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, outcome.model(ids).logits)


def test_an_interrupted_structured_job_leaves_no_output(tmp_path, monkeypatch):
    from helpers.loading_toys import write_structured_job

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunekit.structures.prune.prune_structured", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(write_structured_job(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["job.yaml", "x.pt"]
