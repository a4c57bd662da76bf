"""PruneConfig: one list of options, its defaults, its checks, and prune(config=...)."""
import dataclasses

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.oneshot.config import PruneConfig
from prunekit.sparsity.patterns import NM, Unstructured


def test_defaults_are_prunes():
    c = PruneConfig()
    assert (c.sparsity, c.pattern, c.method, c.refine, c.budget, c.capture) == (
        None, "unstructured", "magnitude", None, "uniform", "chain")
    assert (c.exact, c.recalibrate_bn, c.include_head, c.strict, c.sequential, c.shard_calibration) == (
        True, False, False, False, False, False)
    assert pk.PruneConfig is PruneConfig
    assert all(f.metadata.get("help") for f in dataclasses.fields(PruneConfig)), "every option says what it does"


def test_validate_returns_what_the_options_mean():
    checked = PruneConfig(pattern="2:4", method="sparsegpt", refine="lstsq").validate()
    assert checked.pattern == NM(2, 4) and checked.sparsity == 0.5
    assert (checked.method.name, checked.refine.name) == ("sparsegpt", "lstsq")
    assert checked.needs == {"hessian", "dense_target"}
    plain = PruneConfig(sparsity=0.3).validate()
    assert plain.pattern == Unstructured() and plain.sparsity == 0.3 and plain.refine is None and not plain.needs
    assert PruneConfig(sparsity=0.5, refine="none").refine is None  # the command line's spelling


@pytest.mark.parametrize("options,error,match", [
    ({}, ValueError, "^sparsity is required"),
    ({"sparsity": 1.5}, ValueError, "^sparsity must be in"),
    ({"sparsity": "half"}, TypeError, "^sparsity must be a number"),
    ({"sparsity": 0.5, "method": "wandda"}, ValueError, "^method must be one of .*did you mean 'wanda'"),
    ({"sparsity": 0.5, "refine": "snow"}, ValueError, "^refine must be one of .*did you mean 'snows'"),
    ({"sparsity": 0.5, "refine_options": {"k": 1}}, ValueError, "^refine_options were given without refine"),
    ({"sparsity": 0.5, "budget": "globl"}, ValueError, "^budget must be one of .*did you mean 'global'"),
    ({"sparsity": 0.5, "cap": 2}, ValueError, "^cap must be in"),
    ({"sparsity": 0.5, "capture": "replay"}, ValueError, "^capture must be one of chain, rerun"),
    ({"sparsity": 0.5, "overrides": {"fc": 1.0}}, ValueError, r"^overrides\['fc'\] must be in"),
    ({"sparsity": 0.5, "overrides": {"(": 0.5}}, ValueError, "^overrides key '\\(' is not a regular expression"),
    ({"sparsity": 0.5, "overrides": [0.5]}, TypeError, "^overrides must be a mapping"),
    ({"sparsity": 0.5, "include": "("}, ValueError, "^include must be regular expressions"),
    ({"sparsity": 0.5, "exclude": ["a", "[b"]}, ValueError, "^exclude must be regular expressions"),
    ({"sparsity": 0.5, "types": (nn.Conv3d,)}, ValueError, "^types: no layer kind handles 'Conv3d'"),
    ({"sparsity": 0.5, "blocks": "layers.0"}, TypeError, "^blocks must be a list of module names"),
    ({"sparsity": 0.5, "plugins": "my_methods"}, TypeError, "^plugins must be a list of module names"),
    ({"sparsity": 0.5, "max_batches": 0}, ValueError, "^max_batches must be an integer >= 1"),
    ({"sparsity": 0.5, "exact": "yes"}, TypeError, "^exact must be True or False"),
    ({"sparsity": 0.5, "strict": 1}, TypeError, "^strict must be True or False"),
    ({"sparsity": 0.5, "progress": "auto"}, TypeError, "^progress must be True, False or None"),
    ({"sparsity": 0.5, "device": "gpu"}, ValueError, "^device 'gpu' is not a torch device"),
    ({"sparsity": 0.5, "stats_dtype": "float16"}, ValueError, "^stats_dtype must be one of 'float32', 'float64'"),
    ({"pattern": "2-4"}, ValueError, "^pattern must be 'unstructured' or 'N:M'"),
    ({"pattern": "2:4", "sparsity": 0.6}, ValueError, "^sparsity=0.6 contradicts pattern 2:4"),
    ({"pattern": "2:4", "budget": "erk"}, ValueError, "^pattern 2:4 fixes every layer's sparsity"),
    ({"pattern": "1:3", "method": "sparsegpt", "method_options": {"block_size": 128}}, ValueError, "use 126"),
    ({"sparsity": 0.5, "method": "sparsegpt", "method_options": {"damp": -1}}, ValueError, "sparsegpt option damp"),
])
def test_every_check_names_the_option(options, error, match):
    with pytest.raises(error, match=match):
        PruneConfig(**options).validate()


def test_where_puts_the_recipes_section_first():
    with pytest.raises(ValueError, match=r"^prune\.sparsity=0.6 contradicts prune\.pattern 2:4"):
        PruneConfig(pattern="2:4", sparsity=0.6).validate("prune.")
    with pytest.raises(ValueError, match=r"^prune\.device 'gpu' is not a torch device"):
        PruneConfig(sparsity=0.5, device="gpu").validate("prune.")
    with pytest.raises(ValueError, match=r"^prune\.method must be one of"):
        PruneConfig(sparsity=0.5, method="obs").validate("prune.")


def test_an_unknown_option_names_the_closest():
    with pytest.raises(TypeError, match="unknown pruning option 'sparsty'; did you mean 'sparsity'"):
        PruneConfig().replace(sparsty=0.5)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="unknown pruning option 'refine_option'; did you mean 'refine_options'"):
        pk.prune(model, None, sparsity=0.5, refine_option={"k": 1})
    with pytest.raises(TypeError, match="config must be a prunekit.PruneConfig"):
        pk.prune(model, None, {"sparsity": 0.5})


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_prune_with_a_config_equals_prune_with_the_same_keywords():
    data = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    options = dict(sparsity=0.5, method="sparsegpt", refine="lstsq", method_options={"block_size": 8},
                   exclude="^0$", progress=False)
    by_keywords, by_config, mixed = _mlp(), _mlp(), _mlp()
    a = pk.prune(by_keywords, data, **options)
    b = pk.prune(by_config, data, config=PruneConfig(**options))
    c = pk.prune(mixed, data, PruneConfig(**{**options, "sparsity": 0.9}), sparsity=0.5)  # keywords win
    for model in (by_config, mixed):
        assert all(torch.equal(x, y) for x, y in zip(by_keywords.state_dict().values(), model.state_dict().values()))
    assert [r.name for r in a.layers] == [r.name for r in b.layers] == [r.name for r in c.layers] == ["2"]


def test_a_config_is_not_changed_by_prune():
    config = PruneConfig(sparsity=0.5)
    pk.prune(_mlp(), None, config, exclude="^2$", progress=False)
    assert config == PruneConfig(sparsity=0.5)


def test_every_option_is_a_recipe_key_and_a_flag_or_says_why_not():
    """The recipe and the command line are views of PruneConfig: a new field is a recipe key and
    a flag unless their lists of exceptions name it, with the reason."""
    from prunekit.cli.prune_cmd import NOT_ON_COMMAND_LINE, config_flags
    from prunekit.jobs.recipe import NOT_IN_RECIPE, _fields

    names = {f.name for f in dataclasses.fields(PruneConfig)}
    both = names | {f.name for f in dataclasses.fields(pk.StructuredConfig)}  # the command line serves both
    assert set(NOT_IN_RECIPE) <= names and set(NOT_ON_COMMAND_LINE) <= both  # no stale exceptions
    assert set(_fields(PruneConfig)) == names - set(NOT_IN_RECIPE)
    assert set(config_flags()) == both - set(NOT_ON_COMMAND_LINE)
    assert all(NOT_IN_RECIPE.values()) and all(NOT_ON_COMMAND_LINE.values())


def test_a_field_without_a_command_line_form_is_refused(monkeypatch):
    from prunekit.cli import prune_cmd

    monkeypatch.delitem(prune_cmd.NOT_ON_COMMAND_LINE, "types")
    with pytest.raises(TypeError, match="PruneConfig.types .* has no command-line form"):
        prune_cmd.config_flags()
