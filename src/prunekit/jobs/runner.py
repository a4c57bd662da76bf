"""Run a recipe: load the model and data, prune, and write the outputs all or nothing.

:func:`run_recipe` is what ``prunekit prune`` runs. Everything that can be checked before the
model is touched is (the recipe's values, the output folder, one forward on the first
calibration batch), so a mistake costs seconds, not a pruning run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from ..formats.atomic import check_output, write_folder
from .recipe import Recipe, load_recipe
from .torchrun import is_writer, process_group, split_for_ranks, wait_for_writer


@dataclass
class RecipeOutcome:
    """What :func:`run_recipe` did: the prune result, the output folder, the files in it."""

    result: Any  # prunekit.PruneResult, or prunekit.StructuredResult for a structured: recipe
    output_dir: str
    files: list[str]
    model: Any = None  # the pruned model, still in memory


def run_recipe(recipe: Recipe | str | os.PathLike | Mapping[str, Any], *, overwrite: bool | None = None,
               progress: bool | None = None) -> RecipeOutcome:
    """Run a whole pruning job: validate, load the model, build and check the calibration
    data, prune (masks with :func:`prunekit.prune`, or structures with
    :func:`prunekit.prune_structured` for a recipe with a ``structured:`` section), and write the
    outputs.

    The outputs are written into a hidden sibling folder and renamed to ``output.dir`` only
    when complete, so the output folder never holds a half-written model, even after Ctrl-C.
    An existing output folder is replaced only with ``overwrite`` (default: the recipe's)."""
    from ..llm import decoder_blocks
    from .loading import build_calibration, check_calibration_fits, is_causal_lm, load_model
    from ..oneshot import prune as oneshot  # looked up at call time (tests interrupt it)
    from ..oneshot.blocks import find_blocks
    from ..structures import prune as structured  # looked up at call time too
    from ..structures import channels as channel_pruning  # looked up at call time too
    from ..structures.channel_options import channel_kwargs, channel_tables
    from .job_fit import check_job_fits, is_channel_job

    recipe = load_recipe(recipe)
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    out = os.path.abspath(recipe.output.dir)
    check_output(out, overwrite)
    m = recipe.model
    p = recipe.structured if recipe.structured is not None else recipe.prune
    model, tokenizer = load_model(m.source, state_dict=m.state_dict, kwargs=m.kwargs, gguf_file=m.gguf_file,
                                  root=recipe.folder)
    channels = is_channel_job(recipe.structured)
    if recipe.structured is not None:
        check_job_fits(model, recipe.structured, m.source)
    calibration = None
    blocks = p.blocks
    if recipe.data is not None:
        calibration = build_calibration(dataclasses.asdict(recipe.data), model, tokenizer)
        if blocks is None and is_causal_lm(model) and not channels:
            blocks = decoder_blocks(model)
        check_calibration_fits(model, calibration, last_block=find_blocks(model, blocks)[-1][1])
    config = dataclasses.replace(p, blocks=blocks, progress=progress)
    with process_group(getattr(config, "device", None)) as processes:
        if processes > 1 and not channels:  # torchrun: every rank built the same list; each keeps its share
            config = dataclasses.replace(config, shard_calibration=True)
            if calibration is not None:  # at least one batch for every rank
                calibration = split_for_ranks(calibration, processes)
        if channels:  # every rank prunes on the whole list (prune_channels shares no statistics)
            result = channel_pruning.prune_channels(model, calibration, **channel_kwargs(config),
                                                    **channel_tables(config, model, calibration))
        elif recipe.structured is not None:
            result = structured.prune_structured(model, calibration, config)
        else:
            result = oneshot.prune(model, calibration, config)
        files: list[str] = []
        written = False
        try:
            if is_writer():
                example = calibration[0] if channels else None
                files = write_folder(out, lambda tmp: _write_outputs(tmp, recipe, model, tokenizer, result, example),
                                     overwrite=overwrite)
            written = True
        finally:
            wait_for_writer(written)
    return RecipeOutcome(result, out, files, model)


def _write_outputs(folder: str, recipe: Recipe, model: Any, tokenizer: Any, result: Any, example: Any = None) -> None:
    from ..formats.channels import save_channels, write_record
    from ..formats.compact import save
    from ..formats.pretrained import save_pretrained_compressed
    from .job_fit import is_channel_job

    channels = is_channel_job(recipe.structured)  # its modules' sizes are recorded beside the weights
    is_hf = hasattr(getattr(model, "config", None), "save_pretrained") and hasattr(model, "save_pretrained") \
        and not channels
    formats = recipe.output.formats
    if channels:  # the weights and every module's sizes; compressed (below) only with the sizes
        (save_channels if "hf" in formats else write_record)(model, folder, example_inputs=example)
    elif "hf" in formats and is_hf:
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
    from ..plots import plot_layer_sparsity
    from ..report import model_report

    spec = recipe.to_dict()
    report = model_report(model)
    structured = recipe.structured is not None  # a smaller dense model: no sparsity to plot
    result_dict = ({**dataclasses.asdict(result), "flops_removed": result.flops_removed} if channels
                   else {**dataclasses.asdict(result), "removed_fraction": result.removed_fraction} if structured
                   else result.to_dict())
    with open(os.path.join(folder, "recipe.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    with open(os.path.join(folder, "prune_report.json"), "w", encoding="utf-8") as f:
        json.dump({"result": result_dict, "model": report.to_dict(), "recipe": spec,
                   "recipe_folder": recipe.folder}, f, indent=2)
    with open(os.path.join(folder, "prune_report.md"), "w", encoding="utf-8") as f:
        plot = "" if structured else "![per-layer sparsity](layer_sparsity.png)\n\n"
        f.write(f"# prunekit report\n\n```\n{result.summary()}\n```\n\n## parameters and FLOPs\n\n"
                f"{report.to_markdown()}\n\n{plot}## recipe\n\n```yaml\n"
                f"{yaml.safe_dump(spec, sort_keys=False)}```\n")
    if structured:
        return
    plot_layer_sparsity(report, os.path.join(folder, "layer_sparsity.png"),
                        title=f"{result.method}{'+' + result.refine if result.refine else ''}, {result.pattern}")


DENSE, COMPRESSED = "model.safetensors", "model.prunekit.safetensors"


def load_output(folder: str | os.PathLike, weights: str | os.PathLike | None = None) -> Any:
    """The pruned model in an output folder of :func:`run_recipe`, in eval mode.

    A Hugging Face model comes back from its ``config.json`` (a compressed-only folder through
    :func:`prunekit.load_pretrained_compressed`); any other model, e.g. ``module:factory``, is
    rebuilt as the folder's ``recipe.yaml`` says (source, kwargs), then given the saved weights:
    ``weights`` if given, else ``model.safetensors``, else ``model.prunekit.safetensors``."""
    from ..formats.channels import is_channel_checkpoint, load_sized, read_record
    from .loading import load_model, load_state_dict_file, read_state_dict

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist; pass a folder written by prunekit prune")
    weights = os.fspath(weights) if weights is not None else next(
        (os.path.join(folder, n) for n in (DENSE, COMPRESSED) if os.path.isfile(os.path.join(folder, n))), None)
    if os.path.isfile(os.path.join(folder, "config.json")):
        if weights is not None and os.path.basename(weights) == COMPRESSED:
            from ..formats.pretrained import load_pretrained_compressed

            return load_pretrained_compressed(folder)
        return load_model(folder)[0]
    if not os.path.isfile(os.path.join(folder, "recipe.yaml")):
        raise FileNotFoundError(f"{folder!r} has neither config.json nor recipe.yaml, so it is not an output folder "
                                "of prunekit prune; pass the model with --model (or its folder)")
    if weights is None:
        raise FileNotFoundError(f"output folder {folder!r} holds no weights ({DENSE} or {COMPRESSED}): its "
                                "recipe's output.formats had neither hf nor compressed; prune again with formats "
                                "[hf] or [compressed]")
    # only the model section is needed: formats=[] so that a format since removed does not stop an old folder
    m = load_recipe(os.path.join(folder, "recipe.yaml"), formats=[]).model
    model, _ = load_model(m.source, kwargs=m.kwargs, gguf_file=m.gguf_file, root=_recipe_folder(folder) or folder)
    if is_channel_checkpoint(folder):  # channels removed: the dense model is resized as recorded first
        load_sized(model, read_record(folder), read_state_dict(weights), where=weights)
    else:
        load_state_dict_file(model, weights)
    return model.eval()


def _recipe_folder(folder: str) -> str | None:
    """The folder of the recipe that wrote ``folder`` (its factory modules may live there)."""
    try:
        with open(os.path.join(folder, "prune_report.json"), encoding="utf-8") as f:
            return json.load(f).get("recipe_folder")
    except (OSError, ValueError, AttributeError):
        return None
