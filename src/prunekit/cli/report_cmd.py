"""``prunekit report``: where a model's sparsity is, and what it saves."""
from __future__ import annotations

import argparse
import os

DESCRIPTION = """\
Per-layer sparsity, parameter and FLOP counts of a model or a pruned checkpoint.

MODEL_OR_CHECKPOINT is a Hugging Face model directory, an output directory of prunekit prune
(for a 'package.module:factory' model, rebuilt from its recipe.yaml), 'package.module:factory' (with --state-dict), builtin:minilm / builtin:smollm2, or a compressed
checkpoint written by prunekit.save (a .safetensors file; give its model with --model, or keep
it in a prunekit output directory beside the Hugging Face files).

examples:
  prunekit report out/
  prunekit report out/model.prunekit.safetensors --format markdown --output report.md --plot sparsity.png
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="per-layer sparsity table, parameter and FLOP counts",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("--model", help="the model a compressed checkpoint belongs to (directory or module:factory)")
    p.add_argument("--state-dict", help="weights for a module:factory model")
    p.add_argument("--format", choices=["terminal", "markdown", "json"], default="terminal")
    p.add_argument("--output", help="write the table to this file instead of printing it")
    p.add_argument("--plot", metavar="PNG", help="also write a per-layer sparsity bar chart")
    return p


def load_target(args: argparse.Namespace):
    """The model named by the command line, with a compressed checkpoint's weights applied."""
    from ..export import load
    from ..loading import load_model

    target = args.target
    if (os.path.isdir(target) and not args.model and os.path.isfile(os.path.join(target, "recipe.yaml"))
            and not os.path.exists(os.path.join(target, "config.json"))):
        return from_output_folder(target)
    if target.endswith(".safetensors") and os.path.isfile(target):
        source = args.model or os.path.dirname(os.path.abspath(target))
        if not args.model and not os.path.exists(os.path.join(source, "config.json")):
            raise ValueError(f"{target} is a compressed checkpoint: pass the model it belongs to with --model")
        model, _ = load_model(source, state_dict=args.state_dict)
        load(target, model)
        return model
    model, _ = load_model(target, state_dict=args.state_dict)
    return model


OUTPUT_WEIGHTS = ("model.prunekit.safetensors", "model.safetensors")  # what prunekit prune writes


def from_output_folder(folder: str):
    """A model that ``prunekit prune`` wrote without config.json (a ``package.module:factory``
    model): rebuilt as the folder's recipe.yaml says, with the folder's weights."""
    import yaml

    from ..loading import load_model

    with open(os.path.join(folder, "recipe.yaml"), encoding="utf-8") as f:
        spec = (yaml.safe_load(f) or {}).get("model") or {}
    weights = [os.path.join(folder, w) for w in OUTPUT_WEIGHTS if os.path.isfile(os.path.join(folder, w))]
    if not spec.get("source") or not weights:
        raise FileNotFoundError(f"{folder} has a recipe.yaml but no model source in it or no weights "
                                f"({' or '.join(OUTPUT_WEIGHTS)}); pass the model with --model")
    model, _ = load_model(spec["source"], kwargs=spec.get("kwargs"), state_dict=weights[0])
    return model


def run(args: argparse.Namespace) -> int:
    from ..report import model_report

    report = model_report(load_target(args))
    text = {"terminal": report.to_terminal, "markdown": report.to_markdown, "json": report.to_json}[args.format]()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    elif not args.quiet or args.format != "terminal":
        print(text)
    if args.plot:
        from ..plots import plot_layer_sparsity

        plot_layer_sparsity(report, args.plot, title=os.path.basename(os.path.normpath(args.target)))
    return 0
