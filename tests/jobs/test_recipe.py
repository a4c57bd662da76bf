import os
import sys

import pytest
import torch

from prunekit.jobs.recipe import Recipe, list_recipes, load_recipe, recipe_path

from helpers.loading_toys import write_job  # noqa: E402


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
     "prune.method must be one of magnitude, wanda, sparsegpt.*got 'wandda'; did you mean 'wanda'"),  # plugins may follow
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


def test_override_paths_are_the_callers_and_builtin_names_stay_names(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    path = write_job(tmp_path / "jobs", refine="snows", refine_options={"max_cg": 5})
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.data.tensors == str(tmp_path / "jobs" / "x.pt")  # the recipe file's folder
    changed = recipe.with_overrides(tensors="y.pt", state_dict="w.pt", dir="o")
    assert changed == load_recipe(path, tensors="y.pt", state_dict="w.pt", dir="o")  # one path
    assert (changed.data.tensors, changed.model.state_dict, changed.output.dir) == (
        str(tmp_path / "y.pt"), str(tmp_path / "w.pt"), str(tmp_path / "o"))  # the caller's folder
    assert recipe.with_overrides(tensors="builtin:mnist").data.tensors == "builtin:mnist"
    assert recipe.with_overrides(source="builtin:minilm").model.source == "builtin:minilm"
    assert recipe.with_overrides(refine_options={"k": 2}).prune.refine_options == {"max_cg": 5, "k": 2}  # merged
    assert recipe.with_overrides(refine="none").prune.refine is None


def test_a_data_source_override_replaces_the_recipes(tmp_path):
    recipe = load_recipe(write_job(tmp_path))
    text = recipe.with_overrides(corpus="pydoc", seq_len=16)
    assert (text.data.tensors, text.data.corpus, text.data.seq_len, text.data.batch_size) == (None, "pydoc", 16, 16)
    back = text.with_overrides(tensors="x.pt")
    assert (back.data.corpus, back.data.seq_len, back.data.tensors) == (None, None, os.path.abspath("x.pt"))
    with pytest.raises(ValueError, match="the overrides give 2 data sources"):
        recipe.with_overrides(corpus="pydoc", tensors="x.pt")


def test_nm_pattern_override_drops_the_sparsity_and_overrides_complete_a_recipe(tmp_path):
    recipe = load_recipe(write_job(tmp_path))
    nm = recipe.with_overrides(pattern="2:4")
    assert (nm.prune.pattern, nm.prune.sparsity) == ("2:4", None)
    with pytest.raises(ValueError, match="contradicts prune.pattern 2:4"):
        recipe.with_overrides(pattern="2:4", sparsity=0.6)
    with pytest.raises(ValueError, match="prune.sparsity is required"):
        load_recipe({"model": "m", "prune": {"method": "magnitude"}})
    done = load_recipe({"model": "m", "prune": {"method": "magnitude"}}, sparsity=0.5)
    assert done.prune.sparsity == 0.5 and done.output.dir == "pruned-model"  # a mapping's paths: as given


def test_the_prune_section_is_a_prune_config():
    import prunekit

    recipe = load_recipe({"model": "m", "prune": {"sparsity": 0.5, "overrides": {}, "exclude": "^fc$"}})
    assert recipe.prune == prunekit.PruneConfig(sparsity=0.5, exclude="^fc$")  # an empty mapping: no options
    written = recipe.to_dict()["prune"]
    assert written["sparsity"] == 0.5 and written["method"] == "magnitude" and written["refine"] is None
    assert not {"method_options", "refine_options", "overrides"} & set(written)  # no empty leftovers
    assert load_recipe({"model": "m", "prune": written}) == recipe
    objects = prunekit.PruneConfig(pattern=prunekit.NM(2, 4), device=torch.device("cpu"), stats_dtype=torch.float64)
    assert {k: v for k, v in Recipe(model=recipe.model, prune=objects).to_dict()["prune"].items()
            if k in ("pattern", "device", "stats_dtype")} == {"pattern": "2:4", "device": "cpu", "stats_dtype": "float64"}


def test_prune_section_errors_name_the_key():
    with pytest.raises(ValueError, match=r"prune\.method_options: sparsegpt option block_size must be an integer"):
        load_recipe({"model": "m", "data": {"corpus": "pydoc"},
                     "prune": {"method": "sparsegpt", "sparsity": 0.5, "method_options": {"block_size": 0}}})
    with pytest.raises(ValueError, match=r"prune\.overrides\['fc'\] must be in"):
        load_recipe({"model": "m", "prune": {"sparsity": 0.5, "overrides": {"fc": 2.0}}})
    with pytest.raises(ValueError, match=r"prune\.include must be regular expressions"):
        load_recipe({"model": "m", "prune": {"sparsity": 0.5, "include": ["("]}})
    with pytest.raises(ValueError, match="unknown key 'types' in prune"):  # module classes: Python only
        load_recipe({"model": "m", "prune": {"sparsity": 0.5, "types": ["Linear"]}})


def test_naming_another_step_drops_the_recipes_options_for_the_old_one():
    recipe = load_recipe({"model": "m", "data": {"corpus": "pydoc"},
                          "prune": {"method": "sparsegpt", "method_options": {"damp": 0.1}, "sparsity": 0.5,
                                    "refine": "snows", "refine_options": {"k": 2}}})
    assert recipe.with_overrides(method="sparsegpt").prune.method_options == {"damp": 0.1}
    other = recipe.with_overrides(method="wanda", refine="lstsq")
    assert (other.prune.method_options, other.prune.refine_options) == (None, None)
    assert recipe.with_overrides(refine="none").prune.refine_options is None
    assert recipe.with_overrides(refine="lstsq", refine_options={"damp": 1e-3}).prune.refine_options == {"damp": 1e-3}


def test_execution_device_and_statistics_precision_are_recipe_keys():
    recipe = load_recipe({"model": "m", "prune": {"method": "magnitude", "sparsity": 0.5, "device": "cpu", "stats_dtype": "float32"}})
    assert (recipe.prune.device, recipe.prune.stats_dtype) == ("cpu", "float32")
    with pytest.raises(ValueError, match="prune.stats_dtype must be one of"):
        load_recipe({"model": "m", "prune": {"method": "magnitude", "sparsity": 0.5, "stats_dtype": "float16"}})
    with pytest.raises(ValueError, match="not a torch device"):
        load_recipe({"model": "m", "prune": {"method": "magnitude", "sparsity": 0.5, "device": "gpu"}})


def test_the_structured_section_is_a_structured_config_and_round_trips(tmp_path):
    from prunekit.structures.config import StructuredConfig

    from helpers.loading_toys import write_structured_job

    recipe = load_recipe(write_structured_job(tmp_path, structures="mlp,heads", multiple_of=8))
    assert recipe.structured == StructuredConfig(structures=("mlp", "heads"), ratio=0.5, multiple_of=8)
    assert recipe.to_dict()["structured"]["structures"] == ["mlp", "heads"] and "prune" not in recipe.to_dict()
    assert load_recipe(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown key 'progress' in structured; valid keys: structures, ratio"):
        load_recipe({"model": "m", "structured": {"ratio": 0.5, "progress": True}})


@pytest.mark.parametrize("raw,message", [
    ({"model": "m", "structured": {"raito": 0.5}}, "unknown key 'raito' in structured; did you mean 'ratio'?"),
    ({"model": "m", "structured": {"ratio": "half"}}, "structured.ratio must be a number or null, got 'half'"),
    ({"model": "m", "structured": {"ratio": 1.5}}, r"structured.ratio must be a number in \(0, 1\)"),
    ({"model": "m", "structured": {"ratio": 0.5, "method": "obss"}}, "structured.method must be one of .*did you mean 'obs'"),
    ({"model": "m", "structured": {"method": "wanda"}}, "give exactly one of structured.ratio"),
    ({"model": "m", "structured": {"ratio": 0.5}}, "structured.method 'wanda' with refine 'lstsq' needs calibration data"),
    ({"model": "m", "prune": {"sparsity": 0.5}, "structured": {"ratio": 0.5}}, "both a prune: and a structured: section"),
])
def test_invalid_structured_recipes_are_explained(raw, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        load_recipe(raw)


def test_structured_overrides_route_shared_keys_and_refuse_the_other_kind(tmp_path):
    from helpers.loading_toys import write_structured_job

    path = write_structured_job(tmp_path)
    changed = load_recipe(path, method="obs", refine="none", max_batches=2, params=0.3)
    assert (changed.structured.method, changed.structured.refine, changed.structured.max_batches) == ("obs", None, 2)
    assert changed.prune == load_recipe(path).prune  # the unused mask section is untouched
    # a structured-only key makes a recipe without a job section structured; method follows it
    made = load_recipe({"model": "m", "data": {"corpus": "pydoc"}}, structures="heads", ratio=0.25, method="flap")
    assert made.structured.structures == ("heads",) and made.structured.method == "flap"
    assert load_recipe({"model": "m", "data": {"corpus": "pydoc"}}, method="wanda", sparsity=0.5).structured is None
    with pytest.raises(ValueError, match=r"mask pruning options \(sparsity\) were given for a recipe that removes"):
        load_recipe(path, sparsity=0.5)
    with pytest.raises(ValueError, match=r"structured pruning options \(ratio\) were given for a recipe that prunes"):
        load_recipe(write_job(tmp_path), ratio=0.5)
    with pytest.raises(ValueError, match=r"options of mask pruning \(pattern\) and of structured pruning \(params\)"):
        load_recipe({"model": "m"}, pattern="2:4", params=0.2)
    assert (changed.structured.params, changed.structured.ratio) == (0.3, None)  # params replaces the ratio
