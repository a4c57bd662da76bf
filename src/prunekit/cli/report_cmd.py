"""``prunekit report``: where a model's sparsity is, and what it saves."""
from __future__ import annotations

import argparse
import os

DESCRIPTION = """\
Per-layer sparsity, parameter and FLOP counts of a model or a pruned checkpoint.

MODEL_OR_CHECKPOINT is an output directory of prunekit prune (any model: one given as
'package.module:factory' is rebuilt as the directory's recipe.yaml says), a Hugging Face model
directory, 'package.module:factory' (with --state-dict), builtin:minilm / builtin:smollm2, or a
compressed checkpoint written by prunekit.save (a .safetensors file; give its model with --model,
or keep it in a prunekit output directory).

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
    from ..formats.compact import load
    from ..jobs.runner import COMPRESSED, DENSE, load_output
    from ..jobs.loading import load_model

    target = args.target
    is_file = os.path.isfile(target)
    output = os.path.dirname(os.path.abspath(target)) if is_file else target
    if (not args.model and not args.state_dict and os.path.isfile(os.path.join(output, "recipe.yaml"))
            and (not is_file or os.path.basename(target) in (DENSE, COMPRESSED))):
        return load_output(output, weights=target if is_file else None)  # a folder prunekit prune wrote
    if target.endswith(".safetensors") and os.path.isfile(target):
        source = args.model or os.path.dirname(os.path.abspath(target))
        if not args.model and not os.path.exists(os.path.join(source, "config.json")):
            raise ValueError(f"{target} is a compressed checkpoint: pass the model it belongs to with --model")
        model, _ = load_model(source, state_dict=args.state_dict)
        load(target, model)
        return model
    model, _ = load_model(target, state_dict=args.state_dict)
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
