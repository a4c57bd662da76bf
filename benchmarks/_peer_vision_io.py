"""What benchmarks/structured_vision_peer.py hands the torch-pruning peer, and how both score it (torch only).

The driver (prunekit's venv) writes, into one work folder, each dense model's state dict, the
calibration images with their labels for each seed (torch-pruning's Taylor importance needs a
loss) and the MNIST test tensors; the peer (``.venv-tp``) reads them back. Both processes then
measure accuracy with :func:`accuracy` on the same tensors and fine-tune with
``_vision_common.fine_tune``, so the two tools differ only in how they prune.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
from torch import nn

import _vision_common as vc


def calibration_with_labels(seed: int, images: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``vc.calibration(seed)`` (the same draw) and their labels."""
    x, y = vc.mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:images]
    return x[idx], y[idx]


def write_inputs(work: str, name: str, dense: nn.Module, seeds: list[int]) -> None:
    """Save ``dense``'s state dict, the calibration sets of ``seeds`` and the test and train splits under ``work``."""
    os.makedirs(work, exist_ok=True)
    torch.save(dense.state_dict(), os.path.join(work, f"{name}.pt"))
    for seed in seeds:
        x, y = calibration_with_labels(seed)
        torch.save({"x": x, "y": y}, os.path.join(work, f"calib_s{seed}.pt"))
    for split in ("test", "train"):  # train: the fine-tune's images (the peer's venv has no MNIST package)
        if not os.path.exists(os.path.join(work, f"{split}.pt")):
            x, y = vc.mnist(split)
            torch.save({"x": x, "y": y}, os.path.join(work, f"{split}.pt"))


def use_saved_mnist(work: str) -> None:
    """Make ``_vision_common`` read MNIST from the saved tensors (so ``vc.fine_tune`` runs unchanged
    in a process without the MNIST package)."""
    vc.mnist = lambda split: read_tensors(work, split)


def read_model(work: str, name: str) -> nn.Module:
    """The dense model ``name`` rebuilt from the zoo's definition and the saved state dict, in eval mode."""
    model = vc.MODELS[name].build()
    model.load_state_dict(torch.load(os.path.join(work, f"{name}.pt"), map_location="cpu", weights_only=True))
    return model.eval()


def read_tensors(work: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` saved as ``what`` (``"test"`` or ``"calib_s<seed>"``)."""
    data = torch.load(os.path.join(work, f"{what}.pt"), map_location="cpu", weights_only=True)
    return data["x"], data["y"]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent, in eval mode (the same evaluation for both tools)."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def recipes_to_arg(recipes: list[vc.FineTune]) -> str:
    """The fine-tune recipes as one JSON command-line argument (the driver hands them to the peer
    explicitly, so both processes fine-tune with the same recipes whatever their defaults)."""
    return json.dumps([dataclasses.asdict(r) for r in recipes])


def recipes_from_arg(arg: str) -> list[vc.FineTune]:
    """The recipes :func:`recipes_to_arg` wrote."""
    return [vc.FineTune.from_dict(d) for d in json.loads(arg)]


def fine_tuned_accuracies(model: nn.Module, recipes: list[vc.FineTune], x: torch.Tensor,
                          y: torch.Tensor) -> dict[str, float]:
    """``{recipe.label: accuracy}``: a copy of the same pruned ``model`` fine-tuned with each recipe
    (``model`` itself is left as it is)."""
    return {r.label: accuracy(vc.fine_tune(copy.deepcopy(model), r), x, y) for r in recipes}


def append_row(path: str, row: dict) -> None:
    """Append one result row as a JSON line and flush it (partial results survive an interruption)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_rows(path: str) -> list[dict]:
    """The JSON-line rows written so far (none if the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
