"""A plain classifier training loop and a local cache of trained reference models."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


def cache_dir() -> str:
    """Where trained reference models are kept (``$PRUNEKIT_CACHE`` or ``~/.cache/prunekit``)."""
    path = os.environ.get("PRUNEKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prunekit"))
    os.makedirs(path, exist_ok=True)
    return path


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 2,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    optimizer: str = "sgd",
) -> nn.Module:
    """SGD with momentum (or ``optimizer="adamw"``, weight decay 0.05, as transformers are usually
    trained) and a one-cycle learning rate; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = tqdm(total=steps, desc="train", disable=None if progress else True, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def cached(name: str, factory: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Load ``name`` from the cache, or build it with ``factory``, train it and cache it."""
    path = os.path.join(cache_dir(), f"{name}.pt")
    model = factory()
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except (RuntimeError, OSError, EOFError):
            pass  # stale or corrupted cache: retrain
    model = train(model)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()
