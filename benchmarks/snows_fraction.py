"""SNOWS with the Hessian-vector products on part of each batch (``hessian_fraction``), on the
small ViT and the MobileNetV1 of ``benchmarks/vit_mobilenet.py``: test accuracy after pruning.

The question: does the subsampled Hessian that halves the refit time on 224x224 CNNs
(``benchmarks/snows_cost.py``) keep SNOWS's accuracy on small inputs? Same trained models,
calibration (128 MNIST training images in batches of 64, seeds 100 + s) and first 2000 test images
as ``vit_mobilenet.py``; K = 2 (ViT) or 4 (MobileNet), 1 epoch, max_cg 10. ViT: SparseGPT masks
at 70% and 2:4, fractions 1.0 / 0.5 / 0.25, exact and Gauss-Newton products, seeds 0 and 1.
MobileNet: magnitude and SparseGPT at 90%, magnitude at 2:4, fractions 1.0 and 0.25, seed 0,
accuracy before and after BatchNorm re-estimation.

    python benchmarks/snows_fraction.py     # about 5 minutes; writes results/snows_fraction.json
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vit_mobilenet as vm  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.zoo.mnist import load_mnist  # noqa: E402
from prunekit.zoo.train import accuracy  # noqa: E402


def prune(dense, calibration, method, pattern, options):
    model = copy.deepcopy(dense)
    kwargs = {"pattern": pattern} if ":" in str(pattern) else {"sparsity": float(pattern)}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(model, calibration, method=method, refine="snows", exclude=vm.EXCLUDE, refine_options=options,
                 progress=False, **kwargs)
    return model, time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    x_train, _ = load_mnist("train")
    x_test, y_test = load_mnist("test")
    x_test, y_test = x_test[:2000], y_test[:2000]
    rows = []

    def calibration(seed):
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(100 + seed))[:128]
        return list(x_train[idx].split(64))

    vit = vm.trained("vit")
    for seed in (0, 1):
        for pattern in ("0.7", "2:4"):
            for fraction in (1.0, 0.5, 0.25):
                for hvp in ("exact", "gauss_newton"):
                    options = {"k": 2, "epochs": 1, "max_cg": 10, "hessian_fraction": fraction, "hvp": hvp}
                    model, seconds = prune(vit, calibration(seed), "sparsegpt", pattern, options)
                    rows.append({"model": "vit", "method": "sparsegpt", "pattern": pattern, "seed": seed,
                                 "hessian_fraction": fraction, "hvp": hvp, "accuracy": accuracy(model, x_test, y_test),
                                 "seconds": round(seconds, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    mobilenet = vm.trained("mobilenet")
    for method, pattern in (("magnitude", "0.9"), ("sparsegpt", "0.9"), ("magnitude", "2:4")):
        for fraction in (1.0, 0.25):
            options = {"k": 4, "epochs": 1, "max_cg": 10, "hessian_fraction": fraction}
            model, seconds = prune(mobilenet, calibration(0), method, pattern, options)
            row = {"model": "mobilenet", "method": method, "pattern": pattern, "seed": 0, "hessian_fraction": fraction,
                   "hvp": "exact", "accuracy": accuracy(model, x_test, y_test), "seconds": round(seconds, 1)}
            pk.recalibrate_batchnorm(model, calibration(0))
            row["accuracy_bn"] = accuracy(model, x_test, y_test)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(vm.RESULTS, "snows_fraction.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
