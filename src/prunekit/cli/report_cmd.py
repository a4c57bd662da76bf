"""``prunekit report``: where a model's sparsity is, what it saves, and (``--speed``,
``--baseline``) how fast its forward is, measured against a baseline in the same process."""
from __future__ import annotations

import argparse
import os

DESCRIPTION = """\
Per-layer sparsity, parameter and FLOP counts of a model or a pruned checkpoint; with --speed, also
its measured forward latency on example inputs (the median of --repeats forwards after --warmup
ones), and with --baseline DENSE the same for the baseline, the two models taking turns in this
process with the same threads, and the ratios: parameters, FLOPs and speed-up. FLOPs are then per
forward of the example inputs (the prunable layers and head; attention's own products are not
counted). Example inputs: the first --batch-size rows of --data-tensors FILE, or, for a model with a
vocabulary, --batch-size x --seq-len random token ids.

MODEL_OR_CHECKPOINT is an output directory of prunekit prune (any model: one given as
'package.module:factory' is rebuilt as the directory's recipe.yaml says), a Hugging Face model
directory, 'package.module:factory' (with --state-dict), builtin:minilm / builtin:smollm2, or a
compressed checkpoint written by prunekit.save (a .safetensors file; give its model with --model,
or keep it in a prunekit output directory).

examples:
  prunekit report out/
  prunekit report out/model.prunekit.safetensors --format markdown --output report.md --plot sparsity.png
  prunekit report out/ --baseline builtin:smollm2 --seq-len 256 --batch-size 1 --threads 2
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
    g = p.add_argument_group("speed (measured, not inferred from FLOPs)")
    g.add_argument("--speed", action="store_true", help="measure the forward latency on example inputs")
    g.add_argument("--baseline", metavar="MODEL", help="also measure this model (e.g. the dense one; any MODEL "
                   "form above), taking turns with MODEL, and print the ratios; implies --speed")
    g.add_argument("--data-tensors", metavar="FILE", help="example inputs: a .pt or .npy array [N, ...]")
    g.add_argument("--batch-size", type=int, default=1, help="example inputs per forward (default: 1)")
    g.add_argument("--seq-len", type=int, default=128, help="random token ids per sequence for a model with a "
                   "vocabulary, without --data-tensors (default: 128)")
    g.add_argument("--repeats", type=int, default=10, help="timed forwards per model; the median is reported "
                   "(default: 10)")
    g.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default: 2)")
    g.add_argument("--threads", type=int, help="torch threads for the measurement (default: torch's)")
    return p


def load_target(args: argparse.Namespace, target: str | None = None):
    """The model named by the command line (or ``target``, e.g. the baseline), with a
    compressed checkpoint's weights applied."""
    from ..formats.compact import load
    from ..jobs.runner import COMPRESSED, DENSE, load_output
    from ..jobs.loading import load_model

    if target is not None:
        args = argparse.Namespace(target=target, model=None, state_dict=None)
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


def example_inputs(args: argparse.Namespace, model) -> object:
    """The inputs the speed is measured on: rows of --data-tensors, or random token ids."""
    import torch

    from ..jobs.loading import build_calibration, is_causal_lm
    from ..llm import check_seq_len

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.data_tensors:
        return build_calibration({"tensors": args.data_tensors, "batch_size": args.batch_size}, model)[0]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError("measuring speed needs example inputs: pass --data-tensors FILE (a .pt or .npy array "
                         "[N, ...] the model takes)")
    check_seq_len(model, args.seq_len)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, **({"use_cache": False} if is_causal_lm(model) else {})}


def run(args: argparse.Namespace) -> int:
    from ..report import model_report

    model = load_target(args)
    speed = None
    if args.speed or args.baseline:
        import torch

        from ..speed import speed_report

        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        baseline = load_target(args, args.baseline) if args.baseline else None
        inputs = example_inputs(args, model)
        names = (os.path.basename(os.path.normpath(args.target)) or "model",
                 os.path.basename(os.path.normpath(args.baseline or "")) or "baseline")
        if names[0] == names[1]:
            names = ("model", "baseline")
        speed = speed_report(model, inputs, baseline, names=names, repeats=args.repeats, warmup=args.warmup)
        report = model_report(model, inputs)  # FLOPs per forward of the same inputs
    else:
        report = model_report(model)
    text = {"terminal": report.to_terminal, "markdown": report.to_markdown, "json": report.to_json}[args.format]()
    if speed is not None:
        import json

        text = (json.dumps({**report.to_dict(), "speed": speed.to_dict()}, indent=2) if args.format == "json"
                else f"{text}\n{'```' + chr(10) if args.format == 'markdown' else ''}{speed.to_terminal()}"
                     f"{chr(10) + '```' if args.format == 'markdown' else ''}")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    elif not args.quiet or args.format != "terminal":
        print(text)
    if args.plot:
        from ..plots import plot_layer_sparsity

        plot_layer_sparsity(report, args.plot, title=os.path.basename(os.path.normpath(args.target)))
    return 0
