"""Recipes: one YAML file describing a whole pruning job, checked before any model is loaded.

```yaml
model: {source: path | package.module:factory | builtin:minilm, state_dict: null, kwargs: {}, gguf_file: null}
data: {corpus: pydoc, seq_len: 128, n_sequences: 64, batch_size: 8}   # or text: [a.txt], tensors: x.pt
targets: {include: null, exclude: null, include_head: false}
prune: {method: sparsegpt, refine: null, pattern: unstructured, sparsity: 0.5, budget: uniform}
output: {dir: pruned-model, formats: [hf, compressed], overwrite: false}
```

Unknown keys, wrong types and unknown method/pattern/budget names are reported with the key's
place and the closest valid spelling. Relative paths are read against the recipe's folder
(except the output folder of a shipped recipe, which is the working folder's).
:func:`run_recipe` runs one: load, calibrate, prune, and write the outputs all or nothing.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from .allocation import BUDGETS, check_sparsity
from .loading import BUILTIN_TENSORS, CORPORA, is_factory
from .oneshot import registry
from .patterns import NM, parse_pattern

FORMATS = ("hf", "compressed")


@dataclass
class ModelSpec:
    """What to load: see :func:`prunekit.loading.load_model`."""

    source: str
    state_dict: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    gguf_file: str | None = None


@dataclass
class DataSpec:
    """Calibration data: exactly one of ``text`` / ``corpus`` / ``tensors`` (None: defaults)."""

    text: list[str] | None = None
    corpus: str | None = None
    tensors: str | None = None
    seq_len: int | None = None
    n_sequences: int | None = None
    n_samples: int | None = None
    batch_size: int | None = None


@dataclass
class TargetSpec:
    """Which layers are pruned (regexes over module names), as in :func:`prunekit.find_targets`."""

    include: list[str] | None = None
    exclude: list[str] | None = None
    include_head: bool = False


@dataclass
class PruneSpec:
    """The arguments of :func:`prunekit.prune`."""

    method: str = "sparsegpt"
    refine: str | None = None
    pattern: str = "unstructured"
    sparsity: float | None = None
    budget: str = "uniform"
    cap: float | None = None
    overrides: dict[str, float] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    refine_options: dict[str, Any] = field(default_factory=dict)
    blocks: list[str] | None = None
    plugins: list[str] | None = None  # modules imported first: they register more methods
    snows: dict[str, Any] = field(default_factory=dict)  # deprecated: refine_options


@dataclass
class OutputSpec:
    """Where the pruned model goes; ``formats``: ``hf`` (plain checkpoint), ``compressed``."""

    dir: str = "pruned-model"
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    overwrite: bool = False


@dataclass
class Recipe:
    """A validated recipe. ``path`` is the file it came from (None for a mapping)."""

    model: ModelSpec
    data: DataSpec | None = None
    targets: TargetSpec = field(default_factory=TargetSpec)
    prune: PruneSpec = field(default_factory=PruneSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``recipe.yaml`` in the output folder holds)."""
        out = dataclasses.asdict(self)
        out.pop("path")
        return out

    def with_overrides(self, **flat: Any) -> "Recipe":
        """A copy with some fields replaced, named flat (``sparsity=0.6``, ``dir="out"``) or as
        ``section__key``; None values are ignored (a command-line option not given).
        ``refine="none"`` clears refine. The result is validated again."""
        raw = self.to_dict()
        for key, value in flat.items():
            if value is None:
                continue
            section, name = _locate(key)
            if (section, name) in _PATHS or (name == "source" and os.path.exists(value)):
                value = absolute_path(value)  # a path given on the command line is the working folder's
            if raw.get(section) is None:
                raw[section] = {}
            raw[section][name] = value
        base = os.path.dirname(self.path) if self.path else None
        return _validate(raw, base, source=self.path, packaged=_is_packaged(self.path))


_SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "targets": TargetSpec,
                              "prune": PruneSpec, "output": OutputSpec}
_PATHS = {("output", "dir"), ("model", "state_dict"), ("data", "tensors"), ("data", "text")}
_ALIASES = {"output_dir": ("output", "dir"), "source": ("model", "source"), "model": ("model", "source")}


def _locate(key: str) -> tuple[str, str]:
    if key in _ALIASES:
        return _ALIASES[key]
    if "__" in key:
        section, name = key.split("__", 1)
        if section in _SECTIONS and name in _fields(_SECTIONS[section]):
            return section, name
    owners = [s for s, cls in _SECTIONS.items() if key in _fields(cls)]
    if len(owners) != 1:
        known = sorted({f for cls in _SECTIONS.values() for f in _fields(cls)} | set(_ALIASES))
        raise ValueError(_unknown(key, "the overrides", known))
    return owners[0], key


def absolute_path(value: Any) -> Any:
    """A path (or list of paths) made absolute against the working folder; builtin: sources stay."""
    if isinstance(value, list):
        return [absolute_path(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and not os.fspath(value).startswith("builtin:"):
        return os.path.abspath(os.fspath(value))
    return value


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "path"]


# -- loading and validation ------------------------------------------------------------------
def load_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """A validated :class:`Recipe` from a YAML file, a shipped recipe's name, or a mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _validate(recipe, None)
    if not isinstance(recipe, (str, os.PathLike)):
        raise TypeError(f"recipe must be a path, a shipped recipe name or a mapping, got {type(recipe).__name__}")
    path = os.fspath(recipe)
    if not os.path.exists(path) and path in list_recipes():
        path = recipe_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe file {path!r} does not exist; pass a YAML file or one of the shipped "
                                f"recipes: {', '.join(list_recipes())}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{where}: invalid YAML: {problem}") from exc
    path = os.path.abspath(path)
    return _validate(raw, os.path.dirname(path), source=path, packaged=_is_packaged(path))


def _validate(raw: Any, base: str | None, source: str | None = None, packaged: bool = False) -> Recipe:
    where = f" in {source}" if source else ""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a recipe must be a mapping with a model: section{where}, got {raw!r}")
    for key in raw:
        if key not in _SECTIONS:
            raise ValueError(_unknown(key, f"the recipe{where}", list(_SECTIONS)))
    if raw.get("model") is None:
        raise ValueError(f"the recipe{where} has no model; add model: {{source: path-or-package.module:factory}}")
    model = raw["model"]
    if isinstance(model, str):
        model = {"source": model}
    if isinstance(model, Mapping) and "source" not in model:
        raise ValueError(f"model{where} has no source; add source: path-or-package.module:factory")
    parts: dict[str, Any] = {"model": _build(ModelSpec, model, "model")}
    for name in ("data", "targets", "prune", "output"):
        if raw.get(name) is not None:
            parts[name] = _build(_SECTIONS[name], raw[name], name)
    recipe = Recipe(**parts, path=source)
    _check_values(recipe)
    _resolve_paths(recipe, base, packaged)
    return recipe


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = _fields(cls)
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(_unknown(key, where, names))
        values[key] = _check_type(value, hints[key], f"{where}.{key}")
    return cls(**values)


def _unknown(key: Any, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key {key!r} in {where}; {hint}"


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it has type ``hint`` (ints pass as floats; a lone string as a list of one)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, option, where)
            except ValueError:
                pass
        raise ValueError(f"{where} must be {_describe(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if isinstance(value, list):
            return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ValueError(f"{where} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict and args[1] is Any:
        return "a mapping"
    if origin is dict:
        return f"a mapping of names to {_describe(args[1]).split(' ', 1)[1]}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _choice(value: Any, choices: tuple, where: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where} must be one of {', '.join(str(c) for c in choices)}, got {value!r}{hint}")


def _check_values(r: Recipe) -> None:
    """The checks types alone cannot make, all before any model is loaded."""
    p, d = r.prune, r.data
    if not r.model.source.strip():
        raise ValueError("model.source is empty; pass a Hugging Face model directory or package.module:factory")
    if p.refine in ("none", "null"):
        p.refine = None
    registry.load_plugins(p.plugins)
    _choice(p.method, registry.names("select"), "prune.method")
    _choice(p.refine, (None, *registry.names("refit")), "prune.refine")
    if p.snows:
        warnings.warn("prune.snows in a recipe is deprecated; write prune.refine_options", DeprecationWarning, stacklevel=2)
        p.refine_options = {**p.snows, **p.refine_options} if p.refine == "snows" else p.refine_options
        p.snows = {}
    _choice(p.budget, BUDGETS, "prune.budget")
    try:
        pattern = parse_pattern(p.pattern)
        if p.sparsity is not None:
            check_sparsity(p.sparsity, "prune.sparsity")
        if p.cap is not None:
            check_sparsity(p.cap, "prune.cap")
        for regex, s in p.overrides.items():
            check_sparsity(s, f"prune.overrides[{regex!r}]")
            re.compile(regex)
        for regex in (r.targets.include or []) + (r.targets.exclude or []):
            re.compile(regex)
        registry.make_options(registry.get(p.method, "select"), p.method_options)
        if p.refine is not None:
            registry.make_options(registry.get(p.refine, "refit"), p.refine_options)
    except (TypeError, ValueError, re.error) as exc:
        raise ValueError(f"prune/targets: {exc}") from exc
    if isinstance(pattern, NM) and p.sparsity is not None and abs(p.sparsity - pattern.sparsity) > 1e-9:
        raise ValueError(f"prune.sparsity {p.sparsity} contradicts prune.pattern {pattern} "
                         f"({pattern.sparsity:g}); remove sparsity")
    if not isinstance(pattern, NM) and p.sparsity is None:
        raise ValueError("prune.sparsity is required for the unstructured pattern; add e.g. sparsity: 0.5")
    if d is None and (registry.get(p.method, "select").needs or p.refine is not None):
        raise ValueError(f"prune.method {p.method!r}" + (f" with refine {p.refine!r}" if p.refine else "")
                         + " needs calibration data; add a data: section (corpus: pydoc, text: [files] or "
                         "tensors: inputs.pt), or use method: magnitude without refine")
    if d is not None:
        _check_data(d)
    for f in r.output.formats:
        _choice(f, FORMATS, "output.formats")
    if not r.output.dir.strip():
        raise ValueError("output.dir is empty; pass the folder to write the pruned model to")


def _check_data(d: DataSpec) -> None:
    given = [k for k in ("text", "corpus", "tensors") if getattr(d, k) is not None]
    if len(given) != 1:
        raise ValueError(f"data needs exactly one of text, corpus or tensors, got {given or 'none'}; "
                         "e.g. data: {corpus: pydoc}")
    if d.corpus is not None:
        _choice(d.corpus, CORPORA, "data.corpus")
    if d.text is not None and not d.text:
        raise ValueError("data.text is an empty list; pass one or more text files")
    only = ("seq_len", "n_sequences") if d.tensors is not None else ("n_samples",)
    for key in only:
        if getattr(d, key) is not None:
            kind = "text and corpus" if key != "n_samples" else "tensors"
            raise ValueError(f"data.{key} applies to {kind} data only; remove it")
    for key in ("seq_len", "n_sequences", "n_samples", "batch_size"):
        value = getattr(d, key)
        if value is not None and value < (2 if key == "seq_len" else 1):
            raise ValueError(f"data.{key} must be at least {2 if key == 'seq_len' else 1}, got {value}")
    if d.tensors is not None and d.tensors.startswith("builtin:"):
        _choice(d.tensors, BUILTIN_TENSORS, "data.tensors")


def _resolve_paths(r: Recipe, base: str | None, packaged: bool) -> None:
    """Relative paths are the recipe file's; a shipped recipe writes into the working folder."""
    if base is None:
        return

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    src = r.model.source
    if not src.startswith("builtin:") and not is_factory(src) and os.path.exists(resolve(src)):
        r.model.source = resolve(src)
    if r.model.state_dict is not None:
        r.model.state_dict = resolve(r.model.state_dict)
    if r.data is not None:
        if r.data.text is not None:
            r.data.text = [resolve(t) for t in r.data.text]
        if r.data.tensors is not None and not r.data.tensors.startswith("builtin:"):
            r.data.tensors = resolve(r.data.tensors)
    if not packaged:
        r.output.dir = resolve(r.output.dir)


# -- shipped recipes -------------------------------------------------------------------------
def _recipes_dir() -> Path:
    return Path(str(resources.files("prunekit").joinpath("recipes")))


def _is_packaged(path: str | None) -> bool:
    return path is not None and Path(path).resolve().parent == _recipes_dir().resolve()


def list_recipes() -> list[str]:
    """Names of the recipes shipped with prunekit (``prunekit.recipe_path(name)`` finds the file)."""
    folder = _recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def recipe_path(name: str) -> str:
    """The file of a shipped recipe, by name (with or without ``.yaml``)."""
    stem = name.removesuffix(".yaml")
    names = list_recipes()
    if stem not in names:
        close = difflib.get_close_matches(stem, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"shipped recipes: {', '.join(names)}"
        raise ValueError(f"no shipped recipe named {name!r}; {hint}")
    return str(_recipes_dir() / f"{stem}.yaml")


# -- running ---------------------------------------------------------------------------------
@dataclass
class RecipeOutcome:
    """What :func:`run_recipe` did: the prune result, the output folder, the files in it."""

    result: Any  # prunekit.PruneResult
    output_dir: str
    files: list[str]
    model: Any = None  # the pruned model, still in memory


def run_recipe(recipe: Recipe | str | os.PathLike | Mapping[str, Any], *, overwrite: bool | None = None,
               progress: bool | None = None) -> RecipeOutcome:
    """Run a whole pruning job: validate, load the model, build and check the calibration
    data, prune, and write the outputs.

    The outputs are written into a hidden sibling folder and renamed to ``output.dir`` only
    when complete, so the output folder never holds a half-written model, even after Ctrl-C.
    An existing output folder is replaced only with ``overwrite`` (default: the recipe's)."""
    import prunekit  # late: prunekit.prune is looked up at call time

    from .llm import decoder_blocks
    from .loading import build_calibration, check_calibration_fits, is_causal_lm, load_model
    from .oneshot.blocks import find_blocks

    recipe = load_recipe(recipe)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    out = os.path.abspath(recipe.output.dir)
    _check_output(out, overwrite)
    m, p, t = recipe.model, recipe.prune, recipe.targets
    root = os.path.dirname(recipe.path) if recipe.path else None
    model, tokenizer = load_model(m.source, state_dict=m.state_dict, kwargs=m.kwargs, gguf_file=m.gguf_file, root=root)
    calibration = None
    blocks = p.blocks
    if recipe.data is not None:
        calibration = build_calibration(dataclasses.asdict(recipe.data), model, tokenizer)
        if blocks is None and is_causal_lm(model):
            blocks = decoder_blocks(model)
        check_calibration_fits(model, calibration, last_block=find_blocks(model, blocks)[-1][1])
    result = prunekit.prune(
        model, calibration, sparsity=p.sparsity, pattern=p.pattern, method=p.method, refine=p.refine,
        budget=p.budget, cap=p.cap, overrides=p.overrides or None, include=t.include, exclude=t.exclude,
        include_head=t.include_head, blocks=blocks, method_options=p.method_options,
        refine_options=p.refine_options if p.refine else None, progress=progress)
    files = _write_all(out, overwrite, lambda tmp: _write_outputs(tmp, recipe, model, tokenizer, result))
    return RecipeOutcome(result, out, files, model)


def _check_output(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"output.dir {out!r} is a file, not a folder; choose another output.dir")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output.dir {out!r} already exists; pass --overwrite / overwrite=True to replace "
                              "it, or choose another output.dir")


def _write_all(out: str, overwrite: bool, write) -> list[str]:
    """Call ``write(tmp)`` on a hidden sibling folder, then move it to ``out`` (replacing an old
    one only with ``overwrite``); on any error, including Ctrl-C, remove what was written."""
    import shutil
    import tempfile

    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
        write(tmp)
        files = sorted(os.listdir(tmp))
        _check_output(out, overwrite)  # it may have appeared while we pruned
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out):
            os.replace(old, out)  # put the previous output back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return files


def _write_outputs(folder: str, recipe: Recipe, model: Any, tokenizer: Any, result: Any) -> None:
    import json

    from .export import save, save_pretrained_compressed

    is_hf = hasattr(getattr(model, "config", None), "save_pretrained") and hasattr(model, "save_pretrained")
    formats = recipe.output.formats
    if "hf" in formats and is_hf:
        model.save_pretrained(folder)
    elif "hf" in formats:
        from safetensors.torch import save_model

        save_model(model, os.path.join(folder, "model.safetensors"))
    if "compressed" in formats:
        if is_hf:
            save_pretrained_compressed(model, folder)  # config.json + model.prunekit.safetensors
        else:
            save(model, os.path.join(folder, "model.prunekit.safetensors"))
    if is_hf and tokenizer is not None and formats:
        tokenizer.save_pretrained(folder)
    from .plots import plot_layer_sparsity
    from .report import model_report

    spec = recipe.to_dict()
    report = model_report(model)
    with open(os.path.join(folder, "recipe.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    with open(os.path.join(folder, "prune_report.json"), "w", encoding="utf-8") as f:
        json.dump({"result": result.to_dict(), "model": report.to_dict(), "recipe": spec}, f, indent=2)
    with open(os.path.join(folder, "prune_report.md"), "w", encoding="utf-8") as f:
        f.write(f"# prunekit report\n\n```\n{result.summary()}\n```\n\n## parameters and FLOPs\n\n"
                f"{report.to_markdown()}\n\n![per-layer sparsity](layer_sparsity.png)\n\n## recipe\n\n```yaml\n"
                f"{yaml.safe_dump(spec, sort_keys=False)}```\n")
    plot_layer_sparsity(report, os.path.join(folder, "layer_sparsity.png"),
                        title=f"{result.method}{'+' + result.refine if result.refine else ''}, {result.pattern}")
