"""Recipes: one YAML file describing a whole pruning job, checked before any model is loaded.

```yaml
model: {source: path | package.module:factory | builtin:minilm, state_dict: null, kwargs: {}, gguf_file: null}
data: {corpus: pydoc, seq_len: 128, n_sequences: 64, batch_size: 8}   # or text: [a.txt], tensors: x.pt
prune: {method: sparsegpt, pattern: unstructured, sparsity: 0.5, exclude: [lm_head]}  # any PruneConfig field
# or, instead of prune:, structured: {structures: mlp, params: 0.2}   # any StructuredConfig field
output: {dir: pruned-model, formats: [hf, compressed], overwrite: false}
```

The ``prune:`` section is a :class:`~prunekit.oneshot.config.PruneConfig`, read and written
directly and checked by its own ``validate()``, less the fields in :data:`NOT_IN_RECIPE`; a
``structured:`` section, in its place, is a :class:`~prunekit.structures.config.StructuredConfig`
in the same way, and the job removes whole structures with :func:`prunekit.prune_structured`.
Unknown keys, wrong types and unknown method/pattern/budget names are reported with the key's
place and the closest valid spelling. Relative paths in a recipe file are read against the
recipe's folder (except the output folder of a shipped recipe, which is the working folder's);
overrides, from Python or the command line, are the caller's and read against the working
folder. :func:`prunekit.run_recipe` (in :mod:`prunekit.jobs`) runs a recipe.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import yaml

from ..oneshot.config import PruneConfig
from ..sparsity.patterns import NM, Unstructured
from ..structures.config import StructuredConfig
from .loading import BUILTIN_TENSORS, CORPORA, is_factory

FORMATS = ("hf", "compressed")
#: output formats prunekit no longer writes -> why, in one line (docs/shipping.md says more)
REMOVED_FORMATS = {
    "compressed-tensors": "its readers now fail or load wrong weights (compressed-tensors 0.15+ has no "
                          "sparse compressors; vLLM and SGLang refuse sparse checkpoints; transformers 5 "
                          "loads random weights)",
}
#: the PruneConfig fields a recipe leaves out, and why (every other field is a key of ``prune:``;
#: a pattern, a device or a dtype is written by its name, e.g. "2:4", "cuda", "float64")
NOT_IN_RECIPE = {
    "types": "module classes, which YAML cannot name: a recipe chooses layers by regex (include, exclude)",
    "progress": "the runner's choice: run_recipe(progress=...), prunekit prune --quiet",
    "shard_calibration": "the runner's: under torchrun every rank builds the same batches and keeps its share",
}
#: the StructuredConfig fields a recipe leaves out, and why
NOT_IN_STRUCTURED_RECIPE = {k: NOT_IN_RECIPE[k] for k in ("progress", "shard_calibration")}


@dataclass
class ModelSpec:
    """What to load: see :func:`prunekit.jobs.loading.load_model`."""

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
class OutputSpec:
    """Where the pruned model goes; ``formats``: ``hf`` (plain checkpoint), ``compressed``
    (prunekit's compact format)."""

    dir: str = "pruned-model"
    formats: list[str] = field(default_factory=lambda: ["hf", "compressed"])
    overwrite: bool = False


@dataclass
class Recipe:
    """A validated recipe. ``path`` is the file it came from (None for a mapping)."""

    model: ModelSpec
    data: DataSpec | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    output: OutputSpec = field(default_factory=OutputSpec)
    path: str | None = field(default=None, compare=False)
    #: set instead of ``prune``: the job removes structures (``prune`` is then unused)
    structured: StructuredConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``recipe.yaml`` in the output folder holds): every key
        of every section, except options mappings left empty; ``structured:`` in place of
        ``prune:`` for a structured job."""
        job = ({"structured": _section(self.structured)} if self.structured is not None
               else {"prune": _section(self.prune)})
        return {"model": dataclasses.asdict(self.model),
                "data": dataclasses.asdict(self.data) if self.data is not None else None,
                **job, "output": dataclasses.asdict(self.output)}

    @property
    def folder(self) -> str | None:
        """The folder of the recipe file (factory modules are imported from it too), or None."""
        return os.path.dirname(self.path) if self.path else None

    def with_overrides(self, **overrides: Any) -> "Recipe":
        """A validated copy with some values replaced: ``load_recipe(self, **overrides)``."""
        return load_recipe(self, **overrides)


_SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "prune": PruneConfig,
                              "structured": StructuredConfig, "output": OutputSpec}
_LEFT_OUT: dict[type, dict[str, str]] = {PruneConfig: NOT_IN_RECIPE, StructuredConfig: NOT_IN_STRUCTURED_RECIPE}
_PATHS = {("output", "dir"), ("model", "state_dict"), ("data", "tensors"), ("data", "text")}
_DATA_SOURCES = ("text", "corpus", "tensors")
_ALIASES = {"output_dir": ("output", "dir"), "source": ("model", "source"), "model": ("model", "source")}


def structured_only() -> set[str]:
    """Keys only a ``structured:`` section has (giving one makes a job structured)."""
    return set(_fields(StructuredConfig)) - set(_fields(PruneConfig))


def _locate(key: str, structured: bool = False) -> tuple[str, str]:
    """The section and name of a flat override; a key of both ``prune:`` and ``structured:``
    (method, refine, blocks, max_batches) goes to the section the job uses."""
    if key in _ALIASES:
        return _ALIASES[key]
    if "__" in key:
        section, name = key.split("__", 1)
        if section in _SECTIONS and name in _fields(_SECTIONS[section]):
            return section, name
    owners = [s for s, cls in _SECTIONS.items() if key in _fields(cls)]
    if set(owners) == {"prune", "structured"}:
        owners = ["structured" if structured else "prune"]
    if len(owners) != 1:
        known = sorted({f for cls in _SECTIONS.values() for f in _fields(cls)} | set(_ALIASES))
        raise ValueError(_unknown(key, "the overrides", known))
    return owners[0], key


def absolute_path(value: Any, folder: str | None = None) -> Any:
    """A path (or list of paths) made absolute against ``folder`` (default: the working folder).
    ``builtin:`` names, empty strings and non-strings stay as they are (validation reports them)."""
    if isinstance(value, list):
        return [absolute_path(v, folder) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.strip() and not value.startswith("builtin:"):
        return os.path.normpath(os.path.join(folder or os.getcwd(), os.path.expanduser(value)))
    return value


def _resolve(section: str, name: str, value: Any, folder: str | None) -> Any:
    """``value`` made absolute against ``folder`` (None: the working folder) where the key is a
    path; a model source only when it is an existing path (else a model name or module:factory)."""
    if (section, name) in _PATHS:
        return absolute_path(value, folder)
    if (section, name) == ("model", "source") and isinstance(value, str) and value.strip() \
            and not value.startswith("builtin:") and not is_factory(value):
        path = absolute_path(value, folder)
        return path if os.path.exists(path) else value
    return value


def _sections(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a raw recipe whose sections can be changed in place (``model: m`` as a mapping)."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    if isinstance(out.get("model"), str):
        out["model"] = {"source": out["model"]}
    return out


def _file_paths(raw: dict[str, Any], folder: str, packaged: bool) -> dict[str, Any]:
    """A recipe file's relative paths are its folder's; a shipped recipe writes into the working folder."""
    if raw.get("output") is None and not packaged:
        raw["output"] = {}
    for section, part in raw.items():
        if not isinstance(part, dict):
            continue  # not a mapping: validation says so
        if section == "output" and not packaged:
            part.setdefault("dir", OutputSpec.dir)
        for name in part:
            if not (packaged and (section, name) == ("output", "dir")):
                part[name] = _resolve(section, name, part[name], folder)
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``overrides`` merged in, following the rules of :func:`load_recipe`."""
    given: dict[tuple[str, str], Any] = {}
    structured = raw.get("structured") is not None or any(
        v is not None and (k in structured_only() or k.startswith("structured__")) for k, v in overrides.items())
    for key, value in overrides.items():
        if value is not None:
            section, name = _locate(key, structured)
            given[section, name] = _resolve(section, name, value, None)
    _check_one_job(raw, given)
    prune = raw.get("prune") if isinstance(raw.get("prune"), dict) else {}
    for step in ("method", "refine"):  # a step's options are its own: naming another step drops them
        if ("prune", step) in given and given["prune", step] != prune.get(step):
            prune.pop(f"{step}_options", None)
    sources = [name for section, name in given if section == "data" and name in _DATA_SOURCES]
    if len(sources) > 1:
        raise ValueError(f"the overrides give {len(sources)} data sources ({', '.join(sources)}); give one of "
                         "text, corpus or tensors (on the command line: --data-text, --corpus or --data-tensors)")
    for (section, name), value in given.items():
        if raw.get(section) is None:
            raw[section] = {}
        part = raw[section]
        if not isinstance(part, dict):
            continue  # not a mapping: validation says so
        if isinstance(value, Mapping) and isinstance(part.get(name), Mapping):
            value = {**part[name], **value}  # options, kwargs, overrides: key by key
        part[name] = value
    if sources and isinstance(raw["data"], dict):  # a new data source replaces the recipe's, and the
        dropped = {*_DATA_SOURCES} - {sources[0]}    # options only the old one took
        dropped |= {"n_samples"} if sources[0] != "tensors" else {"seq_len", "n_sequences"}
        raw["data"] = {k: v for k, v in raw["data"].items() if k not in dropped or ("data", k) in given}
    pattern = given.get(("prune", "pattern"))
    if isinstance(pattern, str) and ":" in pattern and ("prune", "sparsity") not in given \
            and isinstance(raw["prune"], dict):
        raw["prune"].pop("sparsity", None)  # N:M fixes the sparsity: the recipe's would contradict it
    amounts = ("ratio", "params", "flops")  # alternatives: the one given replaces the others
    if isinstance(raw.get("structured"), dict) and sum(("structured", a) in given for a in amounts) == 1:
        for other in amounts:
            if ("structured", other) not in given:
                raw["structured"].pop(other, None)
    return raw


def _check_one_job(raw: dict[str, Any], given: dict[tuple[str, str], Any]) -> None:
    """A job prunes masks (``prune:``) or structures (``structured:``): overrides of the other
    kind than the recipe's, or of both kinds, are refused naming them."""
    mask = sorted(n for s, n in given if s == "prune")
    struct = sorted(n for s, n in given if s == "structured")
    if mask and struct:
        raise ValueError(f"options of mask pruning ({', '.join(mask)}) and of structured pruning "
                         f"({', '.join(struct)}) were given together; a job does one: drop one kind")
    if struct and raw.get("prune") is not None:
        raise ValueError(f"structured pruning options ({', '.join(struct)}) were given for a recipe that prunes masks "
                         "(it has a prune: section); use a recipe with a structured: section, or a model")
    if mask and raw.get("structured") is not None:
        raise ValueError(f"mask pruning options ({', '.join(mask)}) were given for a recipe that removes structures "
                         "(it has a structured: section); use structured options, or a recipe with a prune: section")


def _fields(cls: type) -> list[str]:
    """The keys of a section: its class's fields (a PruneConfig's less :data:`NOT_IN_RECIPE`, a
    StructuredConfig's less :data:`NOT_IN_STRUCTURED_RECIPE`)."""
    return [f.name for f in dataclasses.fields(cls) if f.name != "path" and f.name not in _LEFT_OUT.get(cls, {})]


def _section(config: PruneConfig | StructuredConfig) -> dict[str, Any]:
    """A config as a recipe's ``prune:`` / ``structured:`` mapping: YAML values, no empty options mapping."""
    hints = typing.get_type_hints(type(config))
    out = {}
    for name in _fields(type(config)):
        value = _plain(getattr(config, name))
        mapping = any(typing.get_origin(a) in (dict, collections.abc.Mapping) for a in typing.get_args(hints[name]))
        if not (mapping and not value):
            out[name] = value
    return out


def _plain(value: Any) -> Any:
    """``value`` as YAML can hold it: a pattern, device or dtype by its name, tuples as lists."""
    if isinstance(value, (NM, Unstructured, torch.device)):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- loading and validation ------------------------------------------------------------------
def load_recipe(recipe: str | os.PathLike | Mapping[str, Any] | Recipe, **overrides: Any) -> Recipe:
    """A validated :class:`Recipe` from a YAML file, a shipped recipe's name, a mapping or a
    Recipe, with ``overrides`` applied: the one path by which Python and ``prunekit prune``
    change a recipe.

    Overrides are named flat (``sparsity=0.6``, ``dir="out"``, ``tensors="x.pt"``) or as
    ``section__key``; None values are ignored (an option not given); ``refine="none"`` clears
    refine. Their relative paths are the working folder's (a recipe file's own are its
    folder's); ``builtin:`` names stay names. A data source (``text``, ``corpus``, ``tensors``)
    replaces the recipe's, an N:M ``pattern`` without ``sparsity`` drops the recipe's sparsity,
    another ``method`` (``refine``) drops the recipe's ``method_options`` (``refine_options``),
    ``ratio`` drops a structured recipe's ``params`` and ``params`` its ``ratio``, and mappings
    (options, ``kwargs``, ``overrides``) are merged key by key. The recipe is
    validated once, after the overrides, so they can also complete it."""
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        raw, path = recipe.to_dict(), recipe.path
    elif isinstance(recipe, Mapping):
        raw, path = recipe, None
    elif isinstance(recipe, (str, os.PathLike)):
        raw, path = _read(os.fspath(recipe))
    else:
        raise TypeError(f"recipe must be a path, a shipped recipe name or a mapping, got {type(recipe).__name__}")
    if isinstance(raw, Mapping):
        raw = _sections(raw)
        if path is not None and not isinstance(recipe, Recipe):
            raw = _file_paths(raw, os.path.dirname(path), _is_packaged(path))
        raw = _apply_overrides(raw, overrides)
    return _validate(raw, source=path)


def _read(path: str) -> tuple[Any, str]:
    """The parsed YAML of a recipe file (or a shipped recipe's, by name) and its absolute path."""
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
    return raw, os.path.abspath(path)


def _validate(raw: Any, source: str | None = None) -> Recipe:
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
    if raw.get("prune") is not None and raw.get("structured") is not None:
        raise ValueError(f"the recipe{where} has both a prune: and a structured: section; a job prunes masks (prune:) "
                         "or removes structures (structured:): split it into two recipes")
    parts: dict[str, Any] = {"model": _build(ModelSpec, model, "model")}
    for name in ("data", "prune", "structured", "output"):
        if raw.get(name) is not None:
            parts[name] = _build(_SECTIONS[name], raw[name], name)
    recipe = Recipe(**parts, path=source)
    _check_values(recipe)
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
        if cls in _LEFT_OUT and isinstance(values[key], dict) and not values[key]:
            values[key] = None  # an empty options mapping is no options (and is not written back)
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
    if origin in (list, collections.abc.Sequence):
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if isinstance(value, list):
            return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, collections.abc.Mapping):
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, typing.get_origin(hint) or hint):
        return value
    raise ValueError(f"{where} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):  # what YAML can write: not a pattern, device or dtype object
        return " or ".join(_describe(a) for a in args if a in _YAML or typing.get_origin(a) in _YAML)
    if origin in (list, collections.abc.Sequence):
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin in (dict, collections.abc.Mapping) and args[1] is Any:
        return "a mapping"
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping of names to {_describe(args[1]).split(' ', 1)[1]}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


_YAML = (str, int, float, bool, type(None), list, dict, collections.abc.Sequence, collections.abc.Mapping)


def _choice(value: Any, choices: tuple, where: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where} must be one of {', '.join(str(c) for c in choices)}, got {value!r}{hint}")


def _check_values(r: Recipe) -> None:
    """The checks types alone cannot make, all before any model is loaded; the ``prune:``
    (``structured:``) section is checked by :meth:`PruneConfig.validate`
    (:meth:`StructuredConfig.validate`), its names prefixed with ``prune.`` (``structured.``)."""
    if not r.model.source.strip():
        raise ValueError("model.source is empty; pass a Hugging Face model directory or package.module:factory")
    if r.structured is not None:
        s = r.structured
        s.validate("structured.")
        needs, name, fix = s.needs_data, "structured", "method: magnitude with refine: none"
    else:
        s = r.prune
        steps = s.validate("prune.")
        needs, name, fix = bool(steps.method.needs) or steps.refine is not None, "prune", "method: magnitude without refine"
    if r.data is None and r.structured is not None and "channels" in tuple(r.structured.structures):
        raise ValueError("structured.structures channels needs calibration data (the model is traced on a batch); add "
                         "a data: section (tensors: images.pt or builtin:mnist; --data-tensors on the command line)")
    if r.data is None and needs:
        raise ValueError(f"{name}.method {s.method!r}" + (f" with refine {s.refine!r}" if s.refine else "")
                         + " needs calibration data; add a data: section (corpus: pydoc, text: [files] or "
                         f"tensors: inputs.pt), or use {fix}")
    if r.data is not None:
        _check_data(r.data)
    for f in r.output.formats:
        if f in REMOVED_FORMATS:
            raise ValueError(f"output.formats {f!r} was removed: {REMOVED_FORMATS[f]}; use 'hf' (the ordinary "
                             "checkpoint, zeros in place) or 'compressed' (prunekit's compact format)")
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


# -- shipped recipes -------------------------------------------------------------------------
def _recipes_dir() -> Path:
    return Path(str(resources.files("prunekit.jobs").joinpath("recipes")))


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
