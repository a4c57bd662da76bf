"""The demo: train (or load) a small MNIST CNN, prune copies one shot, compare.

Run with ``make demo`` or ``python -m prunekit.cli.demo``. The model trains once (about a minute on
2 cores) and is cached; each method then prunes a fresh copy at 90% unstructured and at 2:4,
and the table shows test accuracy, achieved sparsity and pruning time.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from ..oneshot import registry
from ..oneshot.prune import prune
from ..zoo.mnist import load_mnist
from ..zoo.models import small_cnn
from ..zoo.train import accuracy, cached, train_classifier



def method_pairs() -> list[tuple[str, str | None]]:
    """From the registry: every method alone; every refine on the first method that needs no
    data; and every refine that looks beyond its layer also on each weight-updating method."""
    methods = [registry.get(n, "method") for n in registry.names("method")]
    refines = [registry.get(n, "refine") for n in registry.names("refine")]
    base = next(m for m in methods if not m.needs)
    pairs = [(m.name, None) for m in methods]
    for r in refines:
        pairs += [(base.name, r.name)]
        if "sequential" in r.needs:
            pairs += [(m.name, r.name) for m in methods if m.updates_weights]
    return pairs

# The stem conv has one input channel (9 weights per filter): pruning it to 90% leaves most
# filters empty, so it stays dense, as in the SNOWS reference setups.
EXCLUDE = r"^0\."


def trained_cnn(epochs: int = 2, seed: int = 0) -> torch.nn.Module:
    """The demo CNN trained on MNIST, cached after the first run."""
    x, y = load_mnist("train")

    def train(model):
        torch.manual_seed(seed)
        return train_classifier(model, x, y, epochs=epochs, lr=0.05, seed=seed)

    torch.manual_seed(seed)
    return cached(f"demo_small_cnn_e{epochs}_s{seed}", small_cnn, train)


def calibration_batches(n: int = 256, batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """``n`` training images (no labels), seeded, in batches."""
    x, _ = load_mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return list(x[idx].split(batch_size))


def run(sparsity: float = 0.9, calib: int = 256, snows_k: int = 4) -> list[dict]:
    """Prune copies of the demo model with every method; returns one row per run."""
    dense = trained_cnn()
    x_test, y_test = load_mnist("test")
    calibration = calibration_batches(calib)
    rows = [{"pattern": "-", "method": "dense", "accuracy": accuracy(dense, x_test, y_test), "sparsity": 0.0, "seconds": 0.0}]
    for pattern in ("unstructured", "2:4"):
        for method, refine in method_pairs():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the 1-channel stem does not fit 2:4; it is listed as skipped
                result = prune(model, calibration, sparsity=sparsity if pattern == "unstructured" else None,
                               pattern=pattern, method=method, refine=refine, exclude=EXCLUDE,
                               refine_options={"k": snows_k, "epochs": 1, "max_cg": 20} if refine == "snows" else None)
            seconds = time.perf_counter() - start  # pruning only, not the evaluation below
            rows.append({
                "pattern": "unstructured" if pattern == "unstructured" else pattern,
                "method": method + (f"+{refine}" if refine else ""),
                "accuracy": accuracy(model, x_test, y_test),
                "sparsity": result.sparsity,
                "seconds": seconds,
            })
    return rows


def format_table(rows: list[dict], sparsity: float) -> str:
    lines = [f"{'pattern':<14} {'method':<18} {'test acc %':>10} {'sparsity %':>10} {'time s':>7}", "-" * 63]
    for r in rows:
        pattern = f"{sparsity:.0%}" if r["pattern"] == "unstructured" else r["pattern"]
        lines.append(f"{pattern:<14} {r['method']:<18} {r['accuracy']:>10.2f} {100 * r['sparsity']:>10.2f} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prunekit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9, help="unstructured sparsity (default 0.9)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument("--snows-k", type=int, default=4, help="SNOWS lookahead operations (default 4)")
    args = parser.parse_args(argv)
    rows = run(args.sparsity, args.calibration, args.snows_k)
    print("\nprunekit demo: one-shot pruning of a small CNN on real MNIST (10k test images)\n")
    print(format_table(rows, args.sparsity))
    print("\nsparsity is over the three pruned convolutions; the 1-channel stem conv and the classifier stay dense.")


if __name__ == "__main__":
    main()
