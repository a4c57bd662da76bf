"""SNOWS with exact vs Gauss-Newton Hessian-vector products on the one-shot benchmark's MNIST ResNet.

Same network, calibration images (512, batches of 128, seed 0), excluded layers and SNOWS settings
as ``benchmarks/oneshot.py`` (K = 8, 1 epoch, max_cg 10, least-squares warm start for unstructured
sparsity, none for N:M), run once with ``hvp="exact"`` (double backward) and once with
``hvp="gauss_newton"`` (J^T J v: a forward-mode JVP and one backward). Reports test accuracy and
CPU seconds. Usage: ``python benchmarks/snows_hvp.py [--settings 0.9/magnitude,1:4/magnitude]``;
writes ``benchmarks/results/snows_hvp.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

import torch

import prunekit as pk
from prunekit.zoo.mnist import load_mnist
from prunekit.zoo.train import accuracy

from oneshot import EXCLUDE, RESULTS, trained_resnet

HVPS = ("exact", "gauss_newton")


def run(dense, calibration, x_test, y_test, pattern: str, method: str, hvp: str) -> dict:
    model = copy.deepcopy(dense)
    kwargs = {"sparsity": float(pattern)} if ":" not in pattern else {"pattern": pattern}
    options = {"k": 8, "epochs": 1, "max_cg": 10, "warm_start": "lstsq" if ":" not in pattern else "none", "hvp": hvp}
    c0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(model, calibration, method=method, refine="snows", exclude=EXCLUDE, refine_options=options,
                 progress=False, **kwargs)
    return {"pattern": pattern, "method": method, "hvp": hvp, "accuracy": accuracy(model, x_test, y_test),
            "cpu_seconds": time.process_time() - c0, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="0.9/magnitude,0.9/sparsegpt,1:4/magnitude",
                    help="comma-separated pattern/method pairs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = trained_resnet()
    x_train, _ = load_mnist("train")
    x_test, y_test = load_mnist("test")
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(100))[:512]
    calibration = list(x_train[idx].split(128))
    rows = []
    for setting in args.settings.split(","):
        pattern, method = setting.split("/")
        for hvp in HVPS:
            rows.append(run(dense, calibration, x_test, y_test, pattern, method, hvp))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(RESULTS, "snows_hvp.json"), "w") as fh:
        json.dump({"dense_accuracy": accuracy(dense, x_test, y_test), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
