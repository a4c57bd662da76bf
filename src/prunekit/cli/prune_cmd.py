"""``prunekit prune``: prune a model from the shell, with a recipe or options.

The pruning flags are derived from the fields of :class:`~prunekit.oneshot.config.PruneConfig`
(masks) and :class:`~prunekit.structures.config.StructuredConfig` (structures, with
``--structures``): ``--field-name``, with its help, its type and its choices; a list or a mapping
is a repeatable flag named in the singular (``--include REGEX``, ``--method-option KEY=VALUE``)
unless the field names its own form. A name both configs have (``--method``, ``--refine``) is one
flag. A field without a flag is in :data:`NOT_ON_COMMAND_LINE`, with the reason.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import sys
import typing

from ..oneshot import registry
from ..oneshot.config import PruneConfig
from ..structures.config import StructuredConfig

CONFIGS = (PruneConfig, StructuredConfig)
#: PruneConfig / StructuredConfig fields without a flag, and why
NOT_ON_COMMAND_LINE = {
    "types": "module classes cannot be named on a command line: choose layers with --include / --exclude",
    "progress": "progress bars show on a terminal; --quiet turns them off",
    "shard_calibration": "set by the runner under torchrun, where every rank builds the same batches",
}

DESCRIPTION = """\
Prune a model one shot and write it to an output directory, with a report (prune_report.md/.json)
and a per-layer sparsity plot (layer_sparsity.png). With --structures (or --ratio / --params, or a
recipe with a structured: section) whole MLP neurons or attention heads are removed instead and the
kept weights refit: a smaller dense model (prunekit.prune_structured), saved with its new widths
(a Hugging Face model: config.json updated, plain from_pretrained loads it) and its summary printed.
--structures channels removes a CNN's coupled channels instead (prunekit.prune_channels: --ratio or
--params or --flops, --method l2/bn/wanda/obs, --refine lstsq/snows/none, --recalibrate-bn, --exclude); the output holds
model.safetensors and prunekit_channels.json, reloaded by prunekit.load_channels(OUT, build_model).
Mask options (--sparsity, --pattern, ...) and structured ones (--structures, --ratio, ...) do not mix.

MODEL is a Hugging Face model directory (or a name available offline), 'package.module:factory'
(with --state-dict), or builtin:minilm / builtin:smollm2. Options override the recipe's values.
The output directory is written only when the job has finished: an error or Ctrl-C leaves it
absent (or, with --overwrite, as it was).

Methods ('prunekit prune --plugin MODULE' imports a module that registers more):
{methods}

examples:
  prunekit prune builtin:minilm --method wanda --sparsity 0.5 --corpus pydoc --output out/
  prunekit prune --recipe minilm-sparsegpt-2of4 --output out/
  prunekit prune my_pkg.models:resnet --state-dict w.pt --data-tensors x.pt --method sparsegpt \\
      --pattern 2:4 --format compressed --output out/
  prunekit prune --recipe cnn-magnitude-snows-90 --refine-option k=2 --refine-option max_cg=10 -o out/
  prunekit prune builtin:smollm2 --structures mlp --params 0.2 --multiple-of 64 --corpus pydoc -o out/
  prunekit prune minilm-structured-mlp-30 --ratio 0.2 -o out/
  prunekit prune prunekit.cli.demo:trained_cnn --structures channels --flops 0.5 --method l2 \
      --data-tensors builtin:mnist -o out/
  prunekit prune cnn-channels-flops-50
"""


def method_table() -> str:
    """One line per registered method: name, role, what it does, its options."""
    return "\n".join(f"  {r['name']:<10} {r['role']:<6} {r['summary']} (options: {', '.join(r['options']) or 'none'})"
                     for r in registry.describe())


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="prune a model one shot and write it with a report",
                       description=DESCRIPTION.format(methods=method_table()), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model to prune (or take it from --recipe)")
    p.add_argument("--recipe", help="a recipe YAML file, or the name of a shipped recipe (prunekit recipes)")
    p.add_argument("-o", "--output", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g = p.add_argument_group("model")
    g.add_argument("--state-dict", help="weights (.pt/.pth/.safetensors) for a module:factory model")
    g.add_argument("--gguf-file", help="GGUF file name inside a model directory")
    add_config_flags(p.add_argument_group("pruning (the fields of prunekit.PruneConfig)"),
                     p.add_argument_group("structured pruning (the fields of prunekit.StructuredConfig; --method, "
                                          "--refine, --block, --max-batches, --exclude and --recalibrate-bn "
                                          "serve both)"))
    g = p.add_argument_group("calibration data")
    g.add_argument("--corpus", choices=["pydoc"], help="built-in offline English text (the standard library's docs)")
    g.add_argument("--data-text", nargs="+", metavar="FILE", help="text files, tokenised with the model's tokenizer")
    g.add_argument("--data-tensors", metavar="FILE", help="a .pt or .npy array of inputs [N, ...]")
    g.add_argument("--seq-len", type=int, help="tokens per calibration sequence (text)")
    g.add_argument("--n-sequences", type=int, help="number of calibration sequences (text)")
    g.add_argument("--batch-size", type=int, help="calibration batch size")
    g = p.add_argument_group("output")
    g.add_argument("--format", help="comma-separated: hf (save_pretrained, the ordinary checkpoint), "
                   "compressed (prunekit.save, the compact format)")
    return p


def config_flags() -> dict[str, tuple[str, object]]:
    """``{field: (flag, form)}`` for every PruneConfig and StructuredConfig field with a flag;
    the form is ``bool``, ``float``, ``int``, ``str``, ``"list"``, ``"mapping"`` or
    ``"index_or_key"`` (digits are an int, anything else a str: ``--input-key 0``), read from the
    field's type (or its ``form`` metadata). A field whose type has no form and is not in
    :data:`NOT_ON_COMMAND_LINE` is a TypeError, so no option is left off the command line by
    accident; so is a name the two configs share with different forms."""
    out = {}
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in NOT_ON_COMMAND_LINE:
                continue
            form = f.metadata.get("form") or _form(hints[f.name])
            if form is None:
                raise TypeError(f"{cls.__name__}.{f.name} ({hints[f.name]}) has no command-line form; give it a flag "
                                "in prunekit.cli.prune_cmd or add it to NOT_ON_COMMAND_LINE with the reason")
            name = f.name.removesuffix("s") if form in ("list", "mapping") else f.name  # repeated: one at a time
            flag = ("--" + name.replace("_", "-"), form)
            if out.get(f.name, flag) != flag:
                raise TypeError(f"{cls.__name__}.{f.name} takes {form} where PruneConfig.{f.name} takes "
                                f"{out[f.name][1]}: one flag cannot serve both; rename the field")
            out[f.name] = flag
    return out


def kinds() -> tuple[set[str], set[str]]:
    """(fields only PruneConfig has, fields only StructuredConfig has), as flags are named."""
    names = [{f.name for f in dataclasses.fields(cls)} for cls in CONFIGS]
    return names[0] - names[1], names[1] - names[0]


def _form(hint: object) -> object:
    """How a value of type ``hint`` is written on a command line (None: it cannot be)."""
    args = [a for a in typing.get_args(hint) or (hint,) if a is not type(None)]
    for a in args:
        origin, inner = typing.get_origin(a), typing.get_args(a)
        if origin in (dict, collections.abc.Mapping) and inner[0] is str:
            return "mapping"
        if origin in (list, collections.abc.Sequence) and inner == (str,):
            return "list"
    return next((t for t in (bool, float, int, str) if t in args), None)


def add_config_flags(group, structured_group=None) -> None:
    """The flags of :func:`config_flags`, with each field's help and choices (method and refine:
    the registered names); StructuredConfig's own fields go in ``structured_group``, and a
    shared field's help says what it means for each."""
    masks = {f.name: f for f in dataclasses.fields(PruneConfig)}
    structured = {f.name: f for f in dataclasses.fields(StructuredConfig)}
    for name, (flag, form) in config_flags().items():
        field = masks.get(name) or structured[name]
        meta = field.metadata
        text = meta["help"].replace("%", "%%")
        if name in registry.ROLES:
            text += f"; known: {', '.join(registry.names(name))}"
        default = field.default
        if name in masks and name in structured and structured[name].metadata["help"] != meta["help"]:
            other = structured[name]  # one flag: its help says what it means for each
            names = other.metadata.get("choices") or ()
            choices = f": {', '.join(names)}" if names and not all(c in other.metadata["help"] for c in names) else ""
            said = lambda d: "" if d is None else f" (default: {d})"  # noqa: E731
            text += (f"{said(default)}; with --structures: {other.metadata['help']}{choices}"
                     f"{said(other.default)}").replace("%", "%%")
            meta, default = {k: v for k, v in meta.items() if k != "choices"}, None
        where = structured_group if name not in masks and structured_group is not None else group
        _add_flag(where, name, flag, form, meta, text, default)


def _add_flag(group, name: str, flag: str, form: object, meta, text: str, default: object) -> None:
    """One flag; ``default`` is what the help says when the flag is not given (None: nothing)."""
    said = ",".join(default) if isinstance(default, tuple) else default
    if form == "mapping":
        group.add_argument(flag, dest=name, action="append", metavar=meta.get("metavar", "KEY=VALUE"),
                           help=text + " (repeatable; VALUE is YAML)")
    elif form == "list":
        group.add_argument(flag, dest=name, action="append", metavar=meta.get("metavar", "NAME"),
                           help=text + " (repeatable)")
    elif form is bool:
        said = said if not isinstance(said, bool) else "on" if said else "off"
        group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=text + f" (default: {said})")
    else:
        form = index_or_key if form == "index_or_key" else form
        group.add_argument(flag, dest=name, type=form, choices=meta.get("choices"), metavar=meta.get("metavar"),
                           help=text + (f" (default: {said})" if said not in (None, "") else ""))


def index_or_key(text: str) -> int | str:
    """A command-line index or key: ``"0"`` is the int 0 (a tuple's element), ``"-1"`` -1, and
    anything else the string itself (a mapping's key)."""
    try:
        return int(text)
    except ValueError:
        return text


def overrides_from(args: argparse.Namespace) -> dict:
    """The recipe values the command-line options set, named as :func:`prunekit.load_recipe`'s
    overrides (None: an option not given, the recipe's value stays; options mappings add to the
    recipe's key by key)."""
    config = {}
    for name, (flag, form) in config_flags().items():
        value = getattr(args, name)
        config[name] = (parse_options(value, flag) or None) if form == "mapping" else value
    formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format else None
    return {**config, "source": args.model, "state_dict": args.state_dict, "gguf_file": args.gguf_file,
            "corpus": args.corpus, "text": args.data_text, "tensors": args.data_tensors,
            "seq_len": args.seq_len, "n_sequences": args.n_sequences, "batch_size": args.batch_size,
            "dir": args.output, "formats": formats, "overwrite": args.overwrite or None}


def parse_options(values: list[str] | None, flag: str) -> dict:
    """``["k=4", "measured=[relu]"]`` -> ``{"k": 4, "measured": ["relu"]}`` (values read as YAML)."""
    import yaml

    out = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def is_recipe(name: str | None) -> bool:
    """A YAML path or the name of a shipped recipe (so ``prunekit prune RECIPE`` works too)."""
    from ..jobs.recipe import list_recipes

    return bool(name) and (name.endswith((".yaml", ".yml")) or name in list_recipes())


def build_recipe(args: argparse.Namespace):
    """The recipe to run: the --recipe file (or a recipe given as MODEL) with the options applied
    by :func:`prunekit.load_recipe`, as from Python."""
    from ..jobs.recipe import load_recipe

    if is_recipe(args.model) and not args.recipe:
        args.recipe, args.model = args.model, None
    if not args.model and not args.recipe:
        raise ValueError("pass a MODEL or a recipe (prunekit recipes lists the shipped ones; see prunekit prune --help)")
    flags, (mask_only, structured_only) = config_flags(), kinds()
    given = {name for name in flags if getattr(args, name, None) is not None}
    mask, struct = (sorted(flags[n][0] for n in given & only) for only in (mask_only, structured_only))
    if mask and struct:
        raise ValueError(f"{', '.join(mask)} prune masks and {', '.join(struct)} remove structures; a job does "
                         "one: drop one kind (see prunekit prune --help)")
    return load_recipe(args.recipe or {}, **overrides_from(args))


def run(args: argparse.Namespace) -> int:
    from ..jobs.runner import run_recipe

    recipe = build_recipe(args)
    outcome = run_recipe(recipe, progress=False if args.quiet else None)
    if not args.quiet and outcome.files:  # under torchrun, rank 0 writes and speaks for all
        print(outcome.result.summary())
        print(f"wrote {outcome.output_dir}", file=sys.stderr)
    return 0
