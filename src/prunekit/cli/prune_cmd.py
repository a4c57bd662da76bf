"""``prunekit prune``: one-shot prune a model from the shell, with a recipe or options."""
from __future__ import annotations

import argparse
import sys

from ..oneshot import registry

DESCRIPTION = """\
Prune a model one shot and write it to an output directory, with a report (prune_report.md/.json)
and a per-layer sparsity plot (layer_sparsity.png).

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
    g = p.add_argument_group("pruning")
    g.add_argument("--method", help=f"how the support is chosen: {', '.join(registry.names('select'))}")
    g.add_argument("--refine", help=f"refit the surviving weights: none, {', '.join(registry.names('refit'))}")
    g.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="an option of the method (repeatable; VALUE is YAML, e.g. block_size=64)")
    g.add_argument("--refine-option", action="append", metavar="KEY=VALUE",
                   help="an option of the refit (repeatable; e.g. k=4, measured=[relu])")
    g.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import MODULE first, so the methods it registers can be named (repeatable)")
    g.add_argument("--pattern", help="unstructured or N:M, e.g. 2:4")
    g.add_argument("--sparsity", type=float, help="fraction of prunable weights to remove (unstructured)")
    g.add_argument("--budget", choices=["uniform", "global", "erk"], help="how sparsity is spread over layers")
    g.add_argument("--cap", type=float, help="largest per-layer sparsity under a global budget")
    g.add_argument("--include", action="append", help="regex of layer names to prune (repeatable)")
    g.add_argument("--exclude", action="append", help="regex of layer names to leave dense (repeatable)")
    g.add_argument("--snows-k", type=int, help="deprecated: --refine-option k=N")
    g.add_argument("--snows-max-cg", type=int, help="deprecated: --refine-option max_cg=N")
    g.add_argument("--device", help="where the work runs, one block at a time (e.g. cuda); default: where the model is")
    g.add_argument("--stats-dtype", choices=["float32", "float64"],
                   help="precision of statistics and solvers (default: float32; float64 for a float64 model)")
    g.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each layer's requested number of non-zeros where calibration inputs are dead "
                        "(default: on; --no-exact: zero their weights as the reference SparseGPT does)")
    g.add_argument("--recalibrate-bn", action="store_true", default=None,
                   help="re-estimate BatchNorm running statistics on the calibration data after pruning")
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


def overrides_from(args: argparse.Namespace) -> dict:
    """The recipe values the command-line options set, named as :func:`prunekit.load_recipe`'s
    overrides (None: an option not given, the recipe's value stays; options mappings add to the
    recipe's key by key)."""
    legacy = {k: v for k, v in (("k", args.snows_k), ("max_cg", args.snows_max_cg)) if v is not None}
    refine_options = {**legacy, **parse_options(args.refine_option, "--refine-option")}
    method_options = parse_options(args.method_option, "--method-option")
    formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format else None
    return {"source": args.model, "state_dict": args.state_dict, "gguf_file": args.gguf_file,
            "method": args.method, "refine": args.refine, "pattern": args.pattern, "sparsity": args.sparsity,
            "budget": args.budget, "cap": args.cap, "method_options": method_options or None,
            "refine_options": refine_options or None, "plugins": args.plugin,
            "device": args.device, "stats_dtype": args.stats_dtype,
            "exact": args.exact, "recalibrate_bn": args.recalibrate_bn,
            "include": args.include, "exclude": args.exclude,
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
    return load_recipe(args.recipe or {}, **overrides_from(args))


def run(args: argparse.Namespace) -> int:
    from ..jobs.runner import run_recipe

    recipe = build_recipe(args)
    outcome = run_recipe(recipe, progress=False if args.quiet else None)
    if not args.quiet and outcome.files:  # under torchrun, rank 0 writes and speaks for all
        print(outcome.result.summary())
        print(f"wrote {outcome.output_dir}", file=sys.stderr)
    return 0
