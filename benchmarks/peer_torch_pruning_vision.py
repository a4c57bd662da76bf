"""torch-pruning 1.6.1 on the zoo's MNIST models, one shot and after the shared short fine-tune.

Run by ``benchmarks/structured_vision_peer.py`` with ``.venv-tp/bin/python`` (torch and
torch-pruning only; prunekit is never imported: the zoo's model definitions and MNIST loader are
loaded as files by ``_vision_common``). Reads the dense state dict, calibration and test tensors
the driver saved in ``--work``; appends one JSON line per pruned model to ``--out``.

Each model of a seed in ``--finetune-seeds`` is fine-tuned, from the same pruned state, with every
recipe in ``--finetune-recipes`` (the driver passes the recipes it uses itself).

Per model, FLOPs target and importance (``l2``: ``MagnitudeImportance(p=2)``, ``bn``:
``BNScaleImportance``, ``taylor``: ``TaylorImportance`` with gradients of the cross-entropy
summed over the calibration batches): ``tp.pruner.MetaPruner`` with ``global_pruning=False``,
``iterative_steps=1`` (one shot), the classifier ``fc`` in ``ignored_layers`` and the
``pruning_ratio`` searched so that the MACs removed, counted by
``tp.utils.count_ops_and_params``, are as close to the target as the channel counts allow.
ViT (``nn.MultiheadAttention``): ``--vit-configs example`` follows torch-pruning's torchvision
ViT example (``round_to`` = the number of heads, unwrapped parameters detected: the embedding
width shrinks, in every block and in the position embedding); ``num_heads`` passes
``num_heads={mha: mha.num_heads}`` instead (then torch-pruning 1.6.1 keeps the embedding width
and prunes the MLP hidden layers only).
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import sys
import time

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_vision_io as io  # noqa: E402
import _vision_common as vc  # noqa: E402
from _ratio_search import closest_ratio  # noqa: E402

IMPORTANCES = ("l2", "bn", "taylor")


def importance(name: str) -> tp.importance.Importance:
    """The torch-pruning importance behind ``name``."""
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {name!r}")


def pruner_options(model: nn.Module, vit_config: str | None) -> dict:
    """Extra ``MetaPruner`` arguments for models with ``nn.MultiheadAttention`` (none for CNNs)."""
    heads = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not heads:
        return {}
    if vit_config == "example":
        return {"round_to": heads[0].num_heads}
    if vit_config == "num_heads":
        return {"num_heads": {m: m.num_heads for m in heads}}
    raise ValueError(f"vit_config must be 'example' or 'num_heads', got {vit_config!r}")


def prune(model: nn.Module, imp: str, ratio: float, calib: tuple[torch.Tensor, torch.Tensor],
          vit_config: str | None) -> nn.Module:
    """One-shot torch-pruning of ``model`` in place at ``ratio`` with importance ``imp``."""
    x, y = calib
    model.eval()
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=importance(imp), global_pruning=False, pruning_ratio=ratio,
                                  iterative_steps=1, ignored_layers=[model[-1].fc], **pruner_options(model, vit_config))
    if imp == "taylor":
        model.zero_grad(set_to_none=True)
        for xb, yb in zip(x.split(64), y.split(64)):
            nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def tp_macs(model: nn.Module) -> float:
    """MACs of one 1x28x28 image by torch-pruning's counter."""
    return float(tp.utils.count_ops_and_params(model, torch.zeros(1, 1, 28, 28))[0])


def search_ratio(dense: nn.Module, target: float, calib, vit_config: str | None) -> tuple[float, float]:
    """The ``pruning_ratio`` whose removed MACs (torch-pruning's count) are closest to ``target``.
    Channel counts do not depend on the importance, so magnitude pruning stands in for all."""
    base = tp_macs(dense)

    def removed(ratio: float) -> float:
        if ratio == 0:
            return 0.0
        try:
            return 1 - tp_macs(prune(copy.deepcopy(dense), "l2", ratio, calib, vit_config)) / base
        except AssertionError as e:  # e.g. an MHA width that no longer divides by the heads
            raise ValueError(str(e)) from e

    return closest_ratio(removed, target, tol=2e-3)


def count_pickles(paths: list[str], out: str) -> None:
    """Count, with torch-pruning's counter, the MACs of models pickled by the driver (prunekit's
    pruned models, built from the same zoo files) so both tools' FLOPs are counted one way."""
    for module in ("models", "mobilenet", "vit"):
        vc.zoo(module)  # the pickles name classes of the zoo package _vision_common loads
    for path in paths:
        model = torch.load(path, map_location="cpu", weights_only=False)
        io.append_row(out, {"kind": "count", "file": os.path.basename(path), "macs_tp": tp_macs(model)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder the driver wrote the model and tensors to")
    parser.add_argument("--model", choices=sorted(vc.MODELS), help="the model to prune (none: only --count)")
    parser.add_argument("--flops", default="0.3,0.5")
    parser.add_argument("--importances", default=",".join(IMPORTANCES))
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (one-shot rows)")
    parser.add_argument("--finetune-seeds", default="0", help="calibration seeds whose pruned models are fine-tuned")
    parser.add_argument("--finetune-recipes", default=io.recipes_to_arg([vc.FINETUNE]),
                        help="JSON list of _vision_common.FineTune fields; each fine-tuned model gets every recipe, "
                             "each from the same pruned model (the driver passes its own)")
    parser.add_argument("--vit-configs", default="example,num_heads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON-lines file rows are appended to")
    parser.add_argument("--count", nargs="*", default=[],
                        help="pickled models (another tool's pruned ones) to count MACs of with torch-pruning's counter")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    io.use_saved_mnist(args.work)
    count_pickles(args.count, args.out)
    if args.model is None:
        return
    dense = io.read_model(args.work, args.model)
    xt, yt = io.read_tensors(args.work, "test")
    seeds = [int(s) for s in args.seeds.split(",")]
    ft_seeds = {int(s) for s in args.finetune_seeds.split(",") if s}
    recipes = io.recipes_from_arg(args.finetune_recipes)
    calibs = {s: io.read_tensors(args.work, f"calib_s{s}") for s in seeds}
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in dense.modules())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dense.modules())
    configs = args.vit_configs.split(",") if has_mha else [None]
    base = {"kind": "row", "model": args.model, "tool": "torch-pruning", "version": importlib.metadata.version("torch-pruning"),
            "threads": torch.get_num_threads(), "macs_tp_dense": tp_macs(dense), "macs_hooks_dense": vc.macs(dense),
            "params_dense": sum(p.numel() for p in dense.parameters())}
    for target in (float(f) for f in args.flops.split(",")):
        for config in configs:
            ratio, expected = search_ratio(dense, target, calibs[seeds[0]], config)
            for imp in args.importances.split(","):
                if imp == "bn" and not has_bn:
                    io.append_row(args.out, {**base, "target": target, "importance": imp, "config": config,
                                             "error": "no BatchNorm layer: BNScaleImportance has nothing to score"})
                    continue
                for seed in seeds:
                    model = copy.deepcopy(dense)
                    start = time.perf_counter()
                    prune(model, imp, ratio, calibs[seed], config)
                    seconds = time.perf_counter() - start
                    row = {**base, "target": target, "importance": imp, "config": config, "seed": seed, "ratio": ratio,
                           "macs_removed_tp": 1 - tp_macs(model) / base["macs_tp_dense"],
                           "macs_removed_hooks": 1 - vc.macs(model) / base["macs_hooks_dense"],
                           "params": sum(p.numel() for p in model.parameters()), "prune_s": seconds,
                           "oneshot_acc": io.accuracy(model, xt, yt), "finetuned": {}, "error": None,
                           "loadavg": os.getloadavg()}
                    if seed in ft_seeds:
                        row["finetuned"] = io.fine_tuned_accuracies(model, recipes, xt, yt)
                    io.append_row(args.out, row)
                    print(f"{args.model} {target} {config} {imp} s{seed}: ratio {ratio:.3f} removed "
                          f"{100 * row['macs_removed_tp']:.1f}% (search {100 * expected:.1f}%) one-shot "
                          f"{row['oneshot_acc']:.2f} fine-tuned {row['finetuned']}", flush=True)


if __name__ == "__main__":
    main()
