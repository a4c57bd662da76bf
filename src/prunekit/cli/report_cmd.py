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
counted; FLOPs are 2 per multiply-add). Example inputs: the first --batch-size rows of --data-tensors
FILE; or random images of --input-shape C,H,W (default for the output of a channel job: the shape it
was calibrated on); or, for a model with a vocabulary, --batch-size x --seq-len random token ids.
Several batch sizes (--batch-size 1,64) give one table each.

MODEL_OR_CHECKPOINT is an output directory of prunekit prune (any model: one given as
'package.module:factory' is rebuilt as the directory's recipe.yaml says), a Hugging Face model
directory, 'package.module:factory' (with --state-dict), builtin:minilm / builtin:smollm2, or a
compressed checkpoint written by prunekit.save (a .safetensors file; give its model with --model,
or keep it in a prunekit output directory).

examples:
  prunekit report out/
  prunekit report out/model.prunekit.safetensors --format markdown --output report.md --plot sparsity.png
  prunekit report out/ --baseline builtin:smollm2 --seq-len 256 --batch-size 1 --threads 2
  prunekit report cnn-out/ --baseline prunekit.cli.demo:trained_cnn --batch-size 1,64
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
    g.add_argument("--batch-size", type=batch_sizes, default=[1], metavar="N[,N...]",
                   help="example inputs per forward; several, comma-separated, are measured one after another "
                        "(default: 1)")
    g.add_argument("--input-shape", metavar="C,H,W", help="random example inputs of this shape per sample (an image "
                   "model without --data-tensors; default: the shape a channel job's output records)")
    g.add_argument("--seq-len", type=int, default=128, help="random token ids per sequence for a model with a "
                   "vocabulary, without --data-tensors (default: 128)")
    g.add_argument("--repeats", type=int, default=10, help="timed forwards per model; the median is reported "
                   "(default: 10)")
    g.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default: 2)")
    g.add_argument("--threads", type=int, help="torch threads for the measurement (default: torch's)")
    return p


def batch_sizes(text: str) -> list[int]:
    """``"1,64"`` -> ``[1, 64]`` (--batch-size); argparse reports a ValueError as a usage error."""
    sizes = [int(part) for part in text.split(",")]
    if not sizes:
        raise ValueError(text)
    return sizes


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


def example_inputs(args: argparse.Namespace, model, batch_size: int | None = None) -> object:
    """The inputs the speed is measured on: rows of --data-tensors, random images of
    --input-shape (or of the shape a channel job's output records), or random token ids."""
    import torch

    from ..jobs.loading import build_calibration, is_causal_lm
    from ..llm import check_seq_len

    sizes = args.batch_size if isinstance(args.batch_size, list) else [args.batch_size]
    bs = sizes[0] if batch_size is None else batch_size
    if bs < 1:
        raise ValueError(f"--batch-size must be at least 1, got {bs}")
    if args.data_tensors:
        batch = build_calibration({"tensors": args.data_tensors, "batch_size": bs}, model)[0]
        if len(batch) < bs:
            raise ValueError(f"--data-tensors {args.data_tensors} holds {len(batch)} rows, fewer than --batch-size {bs}; "
                             "pass a larger file or a smaller batch size")
        return batch
    shape = input_shape(args)
    if shape is not None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        return torch.randn(bs, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError("measuring speed needs example inputs: pass --data-tensors FILE (a .pt or .npy array "
                         "[N, ...] the model takes) or --input-shape C,H,W")
    check_seq_len(model, args.seq_len)
    ids = torch.randint(0, vocab, (bs, args.seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, **({"use_cache": False} if is_causal_lm(model) else {})}


def input_shape(args: argparse.Namespace) -> list[int] | None:
    """--input-shape C,H,W, else the input shape a channel job's output folder records, else None."""
    from ..formats.channels import is_channel_checkpoint, read_record

    if getattr(args, "input_shape", None):
        try:
            shape = [int(d) for d in args.input_shape.split(",")]
        except ValueError:
            shape = []
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"--input-shape takes positive integers separated by commas (e.g. 1,28,28), got "
                             f"{args.input_shape!r}")
        return shape
    for target in (args.target, getattr(args, "baseline", None)):
        folder = target if target and os.path.isdir(target) else None
        if folder and is_channel_checkpoint(folder):
            return read_record(folder).get("input_shape")
    return None


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
        names = (os.path.basename(os.path.normpath(args.target)) or "model",
                 os.path.basename(os.path.normpath(args.baseline or "")) or "baseline")
        if names[0] == names[1]:
            names = ("model", "baseline")
        speeds = []
        for bs in args.batch_size:  # every size checked before the first is timed
            example_inputs(args, model, bs)
        for bs in args.batch_size:
            inputs = example_inputs(args, model, bs)
            speeds.append((bs, speed_report(model, inputs, baseline, names=names, repeats=args.repeats,
                                            warmup=args.warmup)))
        speed = speeds[0][1]
        report = model_report(model, example_inputs(args, model))  # FLOPs per forward of the first size's inputs
    else:
        report = model_report(model)
    text = {"terminal": report.to_terminal, "markdown": report.to_markdown, "json": report.to_json}[args.format]()
    if speed is not None:
        import json

        if args.format == "json":
            text = json.dumps({**report.to_dict(), "speed": {**speed.to_dict(), "batch_size": speeds[0][0]},
                               "speeds": [{**s.to_dict(), "batch_size": bs} for bs, s in speeds]}, indent=2)
        else:
            fence = "```" if args.format == "markdown" else ""
            tables = "\n\n".join(f"batch size {bs}:\n{s.to_terminal()}" for bs, s in speeds)
            text = f"{text}\n{fence + chr(10) if fence else ''}{tables}{chr(10) + fence if fence else ''}"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    elif not args.quiet or args.format != "terminal":
        print(text)
    if args.plot:
        from ..plots import plot_layer_sparsity

        plot_layer_sparsity(report, args.plot, title=os.path.basename(os.path.normpath(args.target)))
    return 0
