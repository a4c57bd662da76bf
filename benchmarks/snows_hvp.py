"""SNOWS with exact vs Gauss-Newton Hessian-vector products on the one-shot benchmark's MNIST ResNet.

Same network, calibration images (512, batches of 128, seed 0), excluded layers and SNOWS settings
as ``benchmarks/oneshot.py`` (K = 8, 1 epoch, max_cg 10, least-squares warm start for unstructured
sparsity, none for N:M), run once with ``hvp="exact"`` (double backward) and once with
``hvp="gauss_newton"`` (J^T J v: a forward-mode JVP and one backward). Reports test accuracy and
CPU seconds. Usage: ``python benchmarks/snows_hvp.py [--settings 0.9/magnitude,1:4/magnitude]``;
writes ``benchmarks/results/snows_hvp.json``.

``--model vit``: the ViT of ``benchmarks/vit_mobilenet.py`` (``nn.MultiheadAttention``, GELU: there
Gauss-Newton is not the Hessian but its positive semi-definite part) with that benchmark's
calibration seed 0 (128 images, batches of 64), its first 2000 test images and K = 2; writes
``snows_hvp_vit.json``.
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


def run(dense, calibration, x_test, y_test, pattern: str, method: str, hvp: str, k: int = 8,
        exclude: str = EXCLUDE, warm_start: str | None = None) -> dict:
    model = copy.deepcopy(dense)
    kwargs = {"sparsity": float(pattern)} if ":" not in pattern else {"pattern": pattern}
    warm = warm_start or ("lstsq" if ":" not in pattern else "none")
    options = {"k": k, "epochs": 1, "max_cg": 10, "warm_start": warm, "hvp": hvp}
    c0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(model, calibration, method=method, refine="snows", exclude=exclude, refine_options=options,
                 progress=False, **kwargs)
    return {"pattern": pattern, "method": method, "hvp": hvp, "accuracy": accuracy(model, x_test, y_test),
            "cpu_seconds": time.process_time() - c0, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="0.9/magnitude,0.9/sparsegpt,1:4/magnitude",
                    help="comma-separated pattern/method pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=["resnet", "vit"], default="resnet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x_train, _ = load_mnist("train")
    x_test, y_test = load_mnist("test")
    if args.model == "vit":  # vit_mobilenet.py's model, calibration seed 0 and test subset
        import vit_mobilenet

        dense, k, exclude, warm, out = vit_mobilenet.trained("vit"), 2, vit_mobilenet.EXCLUDE, "auto", "snows_hvp_vit.json"
        x_test, y_test = x_test[:2000], y_test[:2000]
        n, batch = 128, 64
    else:
        dense, k, exclude, warm, out = trained_resnet(), 8, EXCLUDE, None, "snows_hvp.json"
        n, batch = 512, 128
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(100))[:n]
    calibration = list(x_train[idx].split(batch))
    rows = []
    for setting in args.settings.split(","):
        pattern, method = setting.split("/")
        for hvp in HVPS:
            rows.append(run(dense, calibration, x_test, y_test, pattern, method, hvp, k, exclude, warm))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(RESULTS, out), "w") as fh:
        json.dump({"dense_accuracy": accuracy(dense, x_test, y_test), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
