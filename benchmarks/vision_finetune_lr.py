"""Which learning rate the vision benchmarks' gentle fine-tune uses: chosen on the dense models only.

``python benchmarks/vision_finetune_lr.py``. The shared short fine-tune (``_vision_common.FINETUNE``,
40 SGD steps at lr 0.01) lowers the accuracy of the already converged dense models, so it is not a
fair "short fine-tune" for a pruned model that is still close to them. This script fine-tunes each
cached dense model of ``_vision_common.MODELS`` with the same steps, batches and order at each
candidate LR and reports the test accuracy before and after. The rule, fixed before running it: the
largest candidate LR whose fine-tune lowers no dense model by more than ``--tolerance`` points
(10 of the 10k test images by default). No pruned model is involved, so the choice cannot favour
either pruner. Results: ``benchmarks/results/vision_finetune_lr.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _vision_common as vc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def controls(names: list[str], lrs: list[float]) -> dict[str, dict[str, float]]:
    """``{model: {"dense": acc, "lr<lr>": acc after the fine-tune at that LR}}`` on the 10k test images."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        out[name] = {"dense": vc.test_accuracy(vc.load_trained(name))}
        for lr in lrs:
            recipe = dataclasses.replace(vc.FINETUNE, lr=lr)
            out[name][recipe.label] = vc.test_accuracy(vc.fine_tune(vc.load_trained(name), recipe))
            print(name, recipe.label, out[name][recipe.label], flush=True)
    return out


def choose(accs: dict[str, dict[str, float]], lrs: list[float], tolerance: float) -> float | None:
    """The largest LR of ``lrs`` whose fine-tune costs no model more than ``tolerance`` points (None: none)."""
    for lr in sorted(lrs, reverse=True):
        label = dataclasses.replace(vc.FINETUNE, lr=lr).label
        if all(a[label] >= a["dense"] - tolerance for a in accs.values()):
            return lr
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet,resnet,vit")
    parser.add_argument("--lrs", default="0.01,0.003,0.001,0.0003")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "vision_finetune_lr.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lrs = [float(v) for v in args.lrs.split(",")]
    start = os.getloadavg()
    accs = controls(args.models.split(","), lrs)
    chosen = choose(accs, [lr for lr in lrs if lr != vc.FINETUNE.lr], args.tolerance)
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]])
    meta = {"command": command, "threads": args.threads, "loadavg_start": start, "loadavg_end": os.getloadavg(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tolerance": args.tolerance,
            "recipe": dataclasses.asdict(vc.FINETUNE), "chosen_lr": chosen}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "accuracy": accs}, f, indent=1)
    labels = [dataclasses.replace(vc.FINETUNE, lr=lr).label for lr in lrs]
    lines = "\n".join(f"| {n} | {a['dense']:.2f} | " + " | ".join(f"{a[k]:.2f}" for k in labels) + " |"
                      for n, a in accs.items())
    verdict = (f"lr {chosen:g}: the largest LR below {vc.FINETUNE.lr:g} whose fine-tune lowers no dense model by more "
               f"than {args.tolerance:g} points" if chosen is not None else "none of the candidates")
    md = f"""# The gentle fine-tune's learning rate, chosen on the dense models only

Command: `{command}`, {args.threads} thread(s), load average {start[0]:.1f} at the start,
{meta['loadavg_end'][0]:.1f} at the end, finished {meta['finished']}.

Every cached dense model of `benchmarks/_vision_common.py`, fine-tuned with
{vc.FINETUNE.describe()}, except for the LR in each column; test accuracy % on the 10k MNIST test
images. Rule (fixed before the run): the largest LR below the shared recipe's whose fine-tune lowers
no dense model by more than {args.tolerance:g} points. No pruned model is fine-tuned here.

| model | dense | {' | '.join(labels)} |
|---|---:|{'---:|' * len(labels)}
{lines}

Chosen: {verdict}.
"""
    with open(args.out[:-5] + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
