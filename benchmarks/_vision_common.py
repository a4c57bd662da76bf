"""Shared, torch-only pieces of the MNIST channel-pruning benchmarks (ours and the peers').

``benchmarks/structured_vision.py`` (prunekit) and a peer such as
``benchmarks/peer_torch_pruning_vision.py`` (run in a venv of its own) must start from the same
trained models and calibration images, fine-tune the same way and be measured the same way, or
their numbers cannot be compared. Everything here needs torch only: the zoo's model and MNIST
files are loaded straight from ``src/prunekit/zoo`` as a package of their own, so ``prunekit``
itself (and its dependencies) is never imported. Use it with::

    sys.path.insert(0, "benchmarks"); import _vision_common as vc
    dense = vc.load_trained("resnet")          # trained and cached by structured_vision.py
    acc = vc.test_accuracy(vc.fine_tune(pruned))

The fine-tune recipe (``FINETUNE``) is fixed: the same batches, in the same order, for every model.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import nn

ZOO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src", "prunekit", "zoo")
_PACKAGE = "_vision_zoo"


def zoo(module: str) -> ModuleType:
    """``src/prunekit/zoo/<module>.py`` imported without importing ``prunekit`` (torch only)."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_PACKAGE, os.path.join(ZOO_DIR, "__init__.py"),
                                                      submodule_search_locations=[os.path.abspath(ZOO_DIR)])
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"prunekit's zoo not found at {ZOO_DIR}")
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{_PACKAGE}.{module}")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the recipe it was trained with (its cache tag says which)."""

    tag: str
    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    optimizer: str
    description: str


def _resnet() -> nn.Module:
    return zoo("models").resnet_mnist(width=8)


def _small_cnn() -> nn.Module:
    return zoo("models").small_cnn()


def _mobilenet() -> nn.Module:
    return zoo("mobilenet").mobilenet_v1_mnist(0.25)


def _vit() -> nn.Module:
    return zoo("vit").vit_mnist(patch=7)


#: The models, trained on the 50k MNIST training images with ``prunekit.zoo.train.train_classifier``
#: (seed 0; one-cycle LR). The MobileNet's tag and recipe are benchmarks/vit_mobilenet.py's, the
#: small CNN's the demo's.
MODELS: dict[str, ModelSpec] = {
    "resnet": ModelSpec("visbench_resnet_mnist_w8_e1_s0", _resnet, 1, 0.1, "sgd",
                        "resnet_mnist(width=8): stem + 3 stages x 2 basic blocks (8/16/32 channels)"),
    "small_cnn": ModelSpec("demo_small_cnn_e2_s0", _small_cnn, 2, 0.05, "sgd",
                           "small_cnn(): the demo's 4-conv CNN, width 32"),
    "mobilenet": ModelSpec("bench_mobilenet_v1_mnist_w25_s0", _mobilenet, 2, 0.1, "sgd",
                           "mobilenet_v1_mnist(0.25): stem + 7 depthwise-separable blocks"),
    "vit": ModelSpec("visbench_vit_mnist_p7_e1_s0", _vit, 1, 2e-3, "adamw",
                     "vit_mnist(patch=7): 4 pre-norm blocks, width 64, 4 heads, MLP 128"),
}


def cache_path(name: str) -> str:
    """Where ``name``'s trained weights are cached (prunekit's cache: ``$PRUNEKIT_CACHE`` or ~/.cache/prunekit)."""
    root = os.environ.get("PRUNEKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prunekit"))
    return os.path.join(root, f"{MODELS[name].tag}.pt")


def load_trained(name: str) -> nn.Module:
    """The cached dense model ``name`` in eval mode (train it first with ``structured_vision.py``)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    path = cache_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/structured_vision.py --models {name}` "
                                "once to train and cache it")
    model = MODELS[name].build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised MNIST images ``[N, 1, 28, 28]`` and labels (``train``: 50k, ``test``: 10k)."""
    return zoo("mnist").load_mnist(split)


def calibration(seed: int, images: int = 512, batch: int = 64) -> list[torch.Tensor]:
    """``images`` training images drawn without replacement by ``seed``, in batches (no labels)."""
    x, _ = mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:images]
    return list(x[idx].split(batch))


@dataclass(frozen=True)
class FineTune:
    """The short fine-tune every model gets: plain SGD (momentum, no weight decay, constant LR),
    cross-entropy, BatchNorm in training mode, on the first ``steps * batch`` images of a fixed
    (``seed``) permutation of the 50k training images, in that order."""

    steps: int = 40
    batch: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0

    @property
    def label(self) -> str:
        """A short name for tables and JSON keys (``lr0.01``): recipes in one run differ by their LR."""
        return f"lr{self.lr:g}"

    @classmethod
    def from_dict(cls, d: dict) -> "FineTune":
        """The recipe ``dataclasses.asdict`` wrote (how a driver hands it to a peer process)."""
        return cls(**{k: d[k] for k in ("steps", "batch", "lr", "momentum", "seed") if k in d})

    def describe(self) -> str:
        return (f"{self.steps} SGD steps of batch {self.batch} (lr {self.lr}, momentum {self.momentum}, no weight "
                f"decay, constant LR, cross-entropy, model in train mode so BatchNorm uses batch statistics and "
                f"updates its running ones) on the first {self.steps * self.batch} images of "
                f"`torch.randperm(50000, generator=torch.Generator().manual_seed({self.seed}))` over the MNIST "
                "training split, the same batches in the same order for every model")


FINETUNE = FineTune()
#: The gentler recipe: the same steps, batches and order at a tenth of the LR. ``FINETUNE`` lowers
#: the accuracy of the converged dense models (lr 0.01); this LR was chosen on the dense models
#: alone (``benchmarks/vision_finetune_lr.py``), before any pruned model was fine-tuned with it.
GENTLE = FineTune(lr=0.001)


def fine_tune(model: nn.Module, recipe: FineTune = FINETUNE) -> nn.Module:
    """Fine-tune ``model`` in place with ``recipe`` (see :class:`FineTune`); returns it in eval mode."""
    x, y = mnist("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.seed))
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    torch.manual_seed(recipe.seed)
    model.train()
    for step in range(recipe.steps):
        idx = order[step * recipe.batch:(step + 1) * recipe.batch]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def test_accuracy(model: nn.Module, images: int = 10000, batch: int = 500) -> float:
    """Top-1 accuracy in percent on the first ``images`` MNIST test images, in eval mode."""
    x, y = mnist("test")
    x, y = x[:images], y[:images]
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


@dataclass
class Latency:
    """Median forward times (ms) of the dense and pruned models, and dense/pruned (> 1: pruned is faster)."""

    batch: int
    dense_ms: float
    pruned_ms: float
    repeats: int
    threads: int = 1

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


@torch.no_grad()
def latency(dense: nn.Module, pruned: nn.Module, batch: int, repeats: int = 20, warmup: int = 3,
            threads: int = 1) -> Latency:
    """CPU forward latency of both models in this process with ``threads`` intra-op threads,
    alternated repeat by repeat on the same random input (so load on the machine hits both
    alike); medians. One thread by default: on a machine shared with other jobs, a second
    thread's barrier waits for a time slice and dominates small models' timings."""
    dense.eval(), pruned.eval()
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            dense(x), pruned(x)
        times: dict[str, list[float]] = {"dense": [], "pruned": []}
        for _ in range(repeats):
            for key, model in (("dense", dense), ("pruned", pruned)):
                start = time.perf_counter()
                model(x)
                times[key].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return Latency(batch, 1e3 * statistics.median(times["dense"]), 1e3 * statistics.median(times["pruned"]),
                   repeats, threads)


def _is_attention(m: nn.Module) -> bool:
    """``nn.MultiheadAttention`` or a drop-in with its layout (prunekit's ``PrunedMultiheadAttention``,
    which may hold fewer heads), recognised by its attributes so that no prunekit import is needed."""
    return isinstance(m, nn.MultiheadAttention) or all(
        hasattr(m, a) for a in ("in_proj_weight", "out_proj", "num_heads", "batch_first"))


def macs(model: nn.Module) -> int:
    """Multiply-adds of one 1x28x28 image through every Conv2d, Linear and multi-head attention
    (forward hooks; for checking any pruner's FLOPs claim the same way). An attention counts its
    q, k, v projections (``in_proj_weight``'s rows: ``3 * heads * head_dim``), its two products
    (``QK^T`` and ``AV``, ``T_q * T_k * heads * head_dim`` each) and ``out_proj``, which stock
    ``nn.MultiheadAttention`` calls without its module hook (a drop-in that calls it as a module is
    counted once). Biases, norms, activations and the softmax are not counted."""
    total = 0
    linear_calls: dict[int, int] = {}

    def hook(m, args, out):
        nonlocal total
        linear_calls[id(m)] = linear_calls.get(id(m), 0) + 1
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    def attention_pre(m, args, kwargs):
        m._macs_out_proj_calls = linear_calls.get(id(m.out_proj), 0)

    def attention(m, args, kwargs, out):
        nonlocal total
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        if getattr(m, "in_proj_weight", None) is None:
            raise ValueError("an nn.MultiheadAttention with separate q/k/v projection weights is not counted")
        inner, embed = m.in_proj_weight.shape[0] // 3, m.in_proj_weight.shape[1]
        seq = 1 if (m.batch_first and q.dim() == 3) else 0
        batch = q.numel() // (q.shape[seq] * q.shape[-1])
        tq, tk = q.shape[seq], k.shape[seq]
        total += batch * (tq * embed * inner + 2 * tk * embed * inner + 2 * tq * tk * inner)
        if linear_calls.get(id(m.out_proj), 0) == m._macs_out_proj_calls:  # out_proj ran without its hook
            total += batch * tq * inner * m.out_proj.out_features
        del m._macs_out_proj_calls

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in model.modules():
        if _is_attention(m):
            handles.append(m.register_forward_pre_hook(attention_pre, with_kwargs=True))
            handles.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, 28, 28))
    finally:
        for h in handles:
            h.remove()
    return total
