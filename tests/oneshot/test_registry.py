"""The one-shot method registry: declarations checked, names and options validated."""
from dataclasses import dataclass

import pytest

from prunekit.oneshot import registry
from prunekit.oneshot.registry import Method, Refine, Update, register


def _shipped(role):
    """Names of the methods prunekit ships (other tests and doc snippets may add their own)."""
    return tuple(n for n in registry.names(role) if registry.get(n, role).__module__.startswith("prunekit."))


def test_builtins_are_registered_in_order():
    assert _shipped("method") == ("magnitude", "wanda", "sparsegpt")
    assert _shipped("refine") == ("lstsq", "snows")
    assert registry.get("sparsegpt", "method").updates_weights
    assert registry.get("wanda", "method").needs == frozenset({"col_norms"})


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'wanda'"):
        registry.get("wandda", "method")
    with pytest.raises(ValueError, match="refine must be one of lstsq, snows"):
        registry.get("magnitude", "refine")  # a method is not a refine


def test_duplicate_and_incomplete_declarations_are_refused():
    with pytest.raises(TypeError, match="already registered"):
        @register
        class Again(Method):
            name = "magnitude"

            def choose(self, problem):
                return Update(problem.weight, problem.weight != 0)

    with pytest.raises(TypeError, match="must declare name"):
        @register
        class Nameless(Refine):
            def refine(self, problem, chosen):
                return chosen

    with pytest.raises(TypeError, match="must implement choose"):
        @register
        class Lazy(Method):
            name = "lazy"

    with pytest.raises(TypeError, match="needs must be a set drawn from"):
        @register
        class Greedy(Method):
            name = "greedy"
            needs = frozenset({"gradients"})

            def choose(self, problem):
                return Update(problem.weight, problem.weight != 0)

    with pytest.raises(TypeError, match="Options must be a dataclass"):
        @register
        class Loose(Refine):
            name = "loose"
            Options = dict

            def refine(self, problem, chosen):
                return chosen
    assert not {"lazy", "greedy", "loose"} & set(registry.names("method") + registry.names("refine"))


def test_options_are_validated_by_the_methods_class():
    @dataclass(frozen=True)
    class Opts:
        alpha: float = 1.0

        def __post_init__(self):
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")

    @register
    class Scaled(Refine):
        name = "scaled-test"
        Options = Opts

        def refine(self, problem, chosen):
            return Update(chosen.weight * self.options.alpha)

    try:
        assert Scaled({"alpha": 2.0}).options == Opts(2.0)
        assert Scaled(Opts(3.0)).options.alpha == 3.0
        with pytest.raises(ValueError, match="unknown scaled-test option 'alpa'; did you mean 'alpha'"):
            Scaled({"alpa": 2.0})
        with pytest.raises(ValueError, match="scaled-test option alpha must be > 0"):
            Scaled({"alpha": -1.0})
        with pytest.raises(TypeError, match="must be a mapping"):
            Scaled(["alpha"])
        with pytest.raises(ValueError, match="it takes no options"):
            registry.get("magnitude", "method")({"x": 1})
    finally:
        registry.unregister("scaled-test")
    assert "scaled-test" not in registry.names("refine")


@pytest.mark.parametrize("name,options,match", [
    ("snows", {"max_cg": 0}, "max_cg must be an integer >= 1"),
    ("snows", {"epochs": 0}, "epochs must be an integer >= 1"),
    ("snows", {"damping": -1e-3}, "damping must be a number in"),
    ("snows", {"shrink": 1.0}, "shrink must be a number in"),
    ("snows", {"cg_tol": 0.0}, "cg_tol must be a number in"),
    ("snows", {"max_steps": 0}, "max_steps must be an integer >= 1 or None"),
    ("snows", {"warm_start": "best"}, "warm_start must be one of"),
    ("snows", {"measured": []}, "measured must be None"),
    ("snows", {"measured": ["("]}, "measured regex"),
    ("snows", {"k": True}, "k must be a non-negative integer"),
    ("sparsegpt", {"block_size": 0}, "block_size must be an integer >= 1"),
    ("sparsegpt", {"damp": float("nan")}, "damp must be a number"),
    ("lstsq", {"damp": -1.0}, "damp must be a number"),
])
def test_degenerate_solver_settings_are_refused(name, options, match):
    role = "refine" if name in registry.names("refine") else "method"
    with pytest.raises(ValueError, match=f"{name} option {match}"):
        registry.get(name, role)(options)


def test_plugins_import_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_scores_plugin.py").write_text(
        "from prunekit.oneshot.registry import Method, Update, register\n"
        "@register\nclass Keep(Method):\n    name = 'keep-all-test'\n"
        "    def choose(self, problem):\n        return Update(problem.weight, problem.weight == problem.weight)\n")
    monkeypatch.chdir(tmp_path)  # found in the working folder, as `prunekit prune --plugin` would
    try:
        registry.load_plugins(["my_scores_plugin"])
        assert "keep-all-test" in registry.names("method")
    finally:
        registry.unregister("keep-all-test")
    with pytest.raises(ValueError, match="plugin 'no_such_plugin_xyz' cannot be imported"):
        registry.load_plugins(["no_such_plugin_xyz"])


def test_the_docs_method_table_is_the_registry():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "index.md").read_text(encoding="utf-8")
    section = text.split("## One-shot methods", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    expected = [[f"`{r['name']}`", r["role"], ", ".join(r["needs"]) or "-", ", ".join(r["options"]) or "-", r["summary"]]
                for r in registry.describe() if r["name"] in _shipped("method") + _shipped("refine")]
    assert rows == expected
