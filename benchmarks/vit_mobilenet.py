"""One-shot pruning of a small ViT and a MobileNetV1 on real MNIST (``make bench-vit-mobilenet``).

Checks, at small scale, the claim SNOWS makes on ViT and MobileNetV1 (Lucas & Mazumder 2025,
arXiv 2411.18376): SNOWS >= layer-wise reconstruction (SparseGPT, least squares) >= magnitude,
most clearly at 2:4 on the ViT and at 90% on the MobileNet. Every method prunes the same layers
(ViT: q/k/v/out_proj of every ``nn.MultiheadAttention`` and the MLPs; MobileNet: every depthwise
and pointwise convolution; patch embedding, stem and head stay dense) from the same calibration
images, at 50/70/90% and 2:4, over 3 calibration seeds. The MobileNet is scored with its BatchNorm
statistics as they were and re-estimated on the calibration images (``pk.recalibrate_batchnorm``).
Training rows: LATS (soft threshold, Chen et al. 2023, arXiv 2302.13019) vs gradual magnitude
pruning (cubic, Zhu & Gupta 2017) training the MobileNet from scratch to 90%, depthwise included.

Results are cached per run in ``benchmarks/results/vit_mobilenet.json`` (an interrupted run
resumes); tables go to ``vit_mobilenet.md`` and the plot to ``vit_mobilenet.png``.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import tempfile
import time
import warnings

import torch
from torch import nn

import prunekit as pk
from prunekit.zoo.mnist import load_mnist
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from prunekit.zoo.train import accuracy, cached, train_classifier
from prunekit.zoo.vit import vit_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PATTERNS = ["0.5", "0.7", "0.9", "2:4"]
BASELINES = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("magnitude", "lstsq")]
SNOWS_KS = [1, 2, 4]
# The MobileNet's SNOWS runs are the slow ones (every depthwise channel is a layer of its own): the
# full K sweep at its headline setting (90%) and at 2:4, K in {1, 4} at 50% and 70%.
FULL_K = {"vit": PATTERNS, "mobilenet": ["0.9", "2:4"]}
EXCLUDE = r"^0\."  # the patch embedding / conv stem (the head is left dense by default)
MODELS = ("vit", "mobilenet")
TRAIN_EPOCHS = {"vit": 6, "mobilenet": 2}


def trained(name: str, seed: int = 0) -> nn.Module:
    """The dense reference model, trained on the 50k MNIST training images (cached)."""
    x, y = load_mnist("train")
    if name == "vit":
        factory, tag, opt = (lambda: vit_mnist(patch=7)), "bench_vit_mnist_p7", dict(lr=2e-3, optimizer="adamw")
    else:
        factory, tag, opt = (lambda: mobilenet_v1_mnist(0.25)), "bench_mobilenet_v1_mnist_w25", dict(lr=0.1)

    def train(model):
        return train_classifier(model, x, y, epochs=TRAIN_EPOCHS[name], seed=seed, **opt)

    torch.manual_seed(seed)
    return cached(f"{tag}_s{seed}", factory, train)


def configs(model: str) -> list[tuple[str, str, str | None, int | None]]:
    out = []
    for pattern in PATTERNS:
        ks = SNOWS_KS if pattern in FULL_K[model] else [SNOWS_KS[0], SNOWS_KS[-1]]
        out += [(pattern, m, r, None) for m, r in BASELINES]
        out += [(pattern, m, "snows", k) for m in ("magnitude", "sparsegpt") for k in ks]
    return out


def key(model, pattern, method, refine, k, seed) -> str:
    return f"{model}|{pattern}|{method}|{refine}|{k}|{seed}"


def run_one(name, dense, calibration, test, pattern, method, refine, k, args) -> dict:
    model = copy.deepcopy(dense)
    kwargs = {"sparsity": float(pattern)} if ":" not in pattern else {"pattern": pattern}
    snows = {"k": k, "epochs": args.epochs, "max_cg": args.max_cg}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pk.prune(model, calibration, method=method, refine=refine, exclude=EXCLUDE,
                          refine_options=snows if refine == "snows" else None, progress=False, **kwargs)
    row = {"model": name, "pattern": pattern, "method": method, "refine": refine, "k": k,
           "seconds": time.perf_counter() - start, "sparsity": result.sparsity,
           "failed": sum("line searches failed" in (r.note or "") for r in result.layers),
           "accuracy": accuracy(model, *test)}
    if name == "mobilenet":
        pk.recalibrate_batchnorm(model, calibration)
        row["accuracy_bn"] = accuracy(model, *test)
    return row


# -------------------------------------------------------------------------- training rows
def train_pruned(method: str, seed: int, args) -> dict:
    """Train the MobileNet from scratch to 90% (all depthwise and pointwise convs, global budget)
    with LATS or GMP, the dense model's recipe (SGD, one-cycle LR) and epochs."""
    x, y = load_mnist("train")
    x, y = x[: args.train_images], y[: args.train_images]
    torch.manual_seed(seed)
    model = mobilenet_v1_mnist(0.25)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("0.")]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batches = math.ceil(len(x) / 128)
    total = args.train_epochs * batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.15)
    if method == "lats":
        pruner = pk.SoftThreshold(model, opt, total_steps=total, schedule="lats", steps_per_epoch=batches,
                                  target_sparsity=0.9, project=True, budget="global", targets=targets)
    else:
        pruner = pk.MagnitudePruner(model, opt, pk.Cubic(0.9, total, start=total // 10, end=7 * total // 10),
                                    budget="global", targets=targets)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(args.train_epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pruner.step()
            sched.step()
    pruner.finalize()
    ws = [model.get_submodule(n).weight for n in targets]
    depthwise = [model.get_submodule(n).weight for n in targets if model.get_submodule(n).groups > 1]
    test = load_mnist("test")
    return {"method": method, "seed": seed, "seconds": time.perf_counter() - start,
            "sparsity": sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws),
            "depthwise_sparsity": sum(int((w == 0).sum()) for w in depthwise) / sum(w.numel() for w in depthwise),
            "accuracy": accuracy(model, *test)}


# -------------------------------------------------------------------------- reports
def label(r: dict) -> str:
    name = r["method"] + (f"+{r['refine']}" if r["refine"] else "")
    return name + (f" K={r['k']}" if r["refine"] == "snows" else "")


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.2f}" + (f" ± {t.std():.2f}" if len(values) > 1 else "")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def table(rows: list[dict], field: str) -> tuple[list[str], dict]:
    by: dict = {}
    for r in rows:
        by.setdefault(label(r), {}).setdefault(r["pattern"], []).append(r)
    names = sorted(by, key=lambda n: (n.split(" ")[0] != "magnitude", "snows" in n, n))
    lines = ["| method | " + " | ".join(p if ":" in p else f"{float(p):.0%}" for p in PATTERNS) + " | mean time | failed line searches |",
             "|" + "---|" * (len(PATTERNS) + 3)]
    for n in names:
        rs = [r for p in PATTERNS for r in by[n].get(p, [])]
        cells = [cell([r[field] for r in by[n].get(p, [])]) for p in PATTERNS]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {mean([r['seconds'] for r in rs]):.0f}s | {mean([r['failed'] for r in rs]):.1f} |")
    means = {n: {p: mean([r[field] for r in by[n].get(p, [])]) for p in PATTERNS} for n in names}
    return lines, means


COLLAPSED = 20.0  # test accuracy % below which a setting is called collapsed for every method


def verdict(means: dict, what: str) -> list[str]:
    """Per setting: magnitude vs the best layer-wise refit vs the best SNOWS row (seed means; the
    best of six SNOWS rows against the best of two layer-wise ones favours SNOWS a little)."""
    out = [f"| {what} | magnitude | best layer-wise | best SNOWS | SNOWS >= layer-wise >= magnitude |",
           "|---|---|---|---|---|"]
    for p in PATTERNS:
        mag = means.get("magnitude", {}).get(p, float("nan"))
        lw = max(((means[n][p], n) for n in ("sparsegpt", "magnitude+lstsq") if n in means), default=(float("nan"), "-"))
        sn = max(((means[n][p], n) for n in means if "snows" in n), default=(float("nan"), "-"))
        if any(math.isnan(v) for v in (mag, lw[0], sn[0])):
            ok = "not run"
        elif max(mag, lw[0], sn[0]) < COLLAPSED:
            ok = "all collapsed (10 classes: chance is ~10%)"
        else:
            ok = "yes" if sn[0] >= lw[0] >= mag else "no"
        out.append(f"| {p if ':' in p else f'{float(p):.0%}'} | {mag:.2f} | {lw[0]:.2f} ({lw[1]}) | "
                   f"{sn[0]:.2f} ({sn[1]}) | {ok} |")
    return out


def write_reports(done: dict, dense: dict, args) -> None:
    rows = [r for k, r in done.items() if not k.startswith("train|")]
    trains = [r for k, r in done.items() if k.startswith("train|")]
    vit = [r for r in rows if r["model"] == "vit"]
    mob = [r for r in rows if r["model"] == "mobilenet"]
    seeds = sorted({int(k.rsplit("|", 1)[1]) for k in done if not k.startswith("train|")})
    lines = [
        "# One-shot pruning: a small ViT and a MobileNetV1 on MNIST, test accuracy %",
        "",
        f"Calibration: {args.calibration} training images in batches of {args.batch_size}, seeds {seeds} "
        f"(mean ± std over seeds); test accuracy on the first {args.test} MNIST test images. SNOWS: K in "
        f"{SNOWS_KS} (measured operations looked ahead; MobileNet: K in {[SNOWS_KS[0], SNOWS_KS[-1]]} at 50% and 70%), {args.epochs} epoch, at most {args.max_cg} CG "
        "iterations, Hessian-vector products on whole batches (what `hessian_fraction=\"auto\"` picks for these "
        "inputs), least-squares warm start on magnitude masks, SparseGPT's weights on its own. "
        "Command: `make bench-vit-mobilenet`. Times: mean pruning seconds per run on a shared 2-core "
        "machine, 1 thread, contended by other jobs: indicative only. 'failed line searches': layers per run "
        "where at least one SNOWS line search found no descent (the layer keeps its best weights).",
        "",
        f"## ViT (patch 7, 4 pre-norm blocks of `nn.MultiheadAttention` + MLP, width 64, "
        f"{sum(p.numel() for p in vit_mnist(patch=7).parameters())} parameters): dense {dense['vit']:.2f}%",
        "",
        "Pruned: q, k, v (row blocks of `in_proj_weight`), `out_proj` and both MLP linears of every block.",
        "",
    ]
    t, vit_means = table(vit, "accuracy")
    lines += t + ["", *verdict(vit_means, "ViT"), ""]
    lines += [
        f"## MobileNetV1 (width 0.25, stem + 7 depthwise-separable blocks, "
        f"{sum(p.numel() for p in mobilenet_v1_mnist(0.25).parameters())} parameters): dense {dense['mobilenet']:.2f}%",
        "",
        "Pruned: every depthwise 3x3 (each channel its own 1x9 matrix) and pointwise 1x1 convolution. "
        "At 2:4 the depthwise convolutions are skipped with a warning and stay dense (one input channel "
        "per group: no N:M group along input channels exists), so only the pointwise ones are 2:4.",
        "",
        "### BatchNorm statistics as they were",
        "",
    ]
    t, mob_means = table(mob, "accuracy")
    lines += t + ["", *verdict(mob_means, "MobileNet"), "",
                  "### BatchNorm statistics re-estimated on the calibration images (`pk.recalibrate_batchnorm`)", ""]
    t, mob_bn_means = table(mob, "accuracy_bn")
    lines += t + ["", *verdict(mob_bn_means, "MobileNet + BN"), ""]
    if trains:
        lines += [
            f"## Training the MobileNet from scratch to 90% ({args.train_epochs} epochs on "
            f"{args.train_images} images, SGD one-cycle, global budget over every depthwise and pointwise conv)",
            "",
            "LATS: `pk.SoftThreshold(schedule='lats', target_sparsity=0.9, project=True)` (prunekit's "
            "target-sparsity control); GMP: `pk.MagnitudePruner` with `pk.Cubic(0.9, ...)` from 10% to 70% "
            "of training.",
            "",
            "| method | test accuracy | sparsity | depthwise sparsity | seeds |",
            "|---|---|---|---|---|",
        ]
        for m in ("lats", "gmp"):
            rs = [r for r in trains if r["method"] == m]
            if rs:
                lines.append(f"| {m} | {cell([r['accuracy'] for r in rs])} | {mean([r['sparsity'] for r in rs]):.4f} | "
                             f"{mean([r['depthwise_sparsity'] for r in rs]):.4f} | {len(rs)} |")
        lines.append("")
    with open(os.path.join(RESULTS, "vit_mobilenet.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    plot({"ViT": vit_means, "MobileNet": mob_means, "MobileNet + BN re-estimation": mob_bn_means}, dense)


def plot(panels: dict, dense: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6))
    for ax, (title, means) in zip(axes, panels.items()):
        for n, by in means.items():
            if "snows" in n and not n.endswith(f"K={SNOWS_KS[-1]}"):
                continue
            ax.plot(range(len(PATTERNS)), [by[p] for p in PATTERNS], marker="o", label=n)
        ax.axhline(dense["vit" if title == "ViT" else "mobilenet"], color="k", ls=":", label="dense")
        ax.set_xticks(range(len(PATTERNS)), [p if ":" in p else f"{float(p):.0%}" for p in PATTERNS])
        ax.set_title(title)
        ax.set_xlabel("sparsity / pattern")
        ax.set_ylabel("test accuracy % (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "vit_mobilenet.png"), dpi=100)


def save(done: dict, path: str) -> None:
    """Merge ``done`` into the JSON cache under a lock (several runs may share it: --models)."""
    with open(os.path.join(tempfile.gettempdir(), "prunekit_vit_mobilenet.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            done.update({k: v for k, v in json.load(open(path)).items() if k not in done})
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(done, f, indent=1)
        os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit,mobilenet", help="comma-separated: vit, mobilenet")
    parser.add_argument("--calibration", type=int, default=128, help="calibration images (default 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="calibration batch = SNOWS mini-batch (default 64)")
    parser.add_argument("--test", type=int, default=2000, help="test images scored (default 2000)")
    parser.add_argument("--epochs", type=int, default=1, help="SNOWS epochs (default 1)")
    parser.add_argument("--max-cg", type=int, default=10, help="SNOWS CG iterations per Newton step (default 10)")
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds (default 3)")
    parser.add_argument("--only-seed", type=int, default=None, help="run only this calibration seed")
    parser.add_argument("--train-seeds", type=int, default=1, help="seeds of the LATS/GMP training rows (0: skip)")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the training rows (default 2)")
    parser.add_argument("--train-images", type=int, default=50000, help="training images of the training rows")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--only", default=None, help="run only runs whose key contains this")
    parser.add_argument("--markdown", "--report-only", dest="report_only", action="store_true",
                        help="rewrite the reports from the cached runs, running nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "vit_mobilenet.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    x_train, _ = load_mnist("train")
    x_test, y_test = load_mnist("test")
    test = (x_test[: args.test], y_test[: args.test])
    dense = {name: accuracy(trained(name), *test) for name in MODELS}
    models = [m for m in args.models.split(",") if m]
    for seed in range(0 if args.report_only else args.seeds):
        if args.only_seed is not None and seed != args.only_seed:
            continue
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(100 + seed))[: args.calibration]
        calibration = list(x_train[idx].split(args.batch_size))
        for name in models:
            model = trained(name)
            for pattern, method, refine, k in configs(name):
                kk = key(name, pattern, method, refine, k, seed)
                if kk in done or (args.only and args.only not in kk):
                    continue
                done[kk] = run_one(name, model, calibration, test, pattern, method, refine, k, args)
                r = done[kk]
                print(f"{kk}: acc {r['accuracy']:.2f}" + (f" (BN {r['accuracy_bn']:.2f})" if "accuracy_bn" in r else "")
                      + f" sparsity {r['sparsity']:.4f} {r['seconds']:.1f}s", flush=True)
                save(done, path)
    for seed in range(0 if args.report_only else args.train_seeds):
        for method in ("lats", "gmp"):
            kk = f"train|{method}|{seed}"
            if kk in done or (args.only and args.only not in kk):
                continue
            done[kk] = train_pruned(method, seed, args)
            print(f"{kk}: acc {done[kk]['accuracy']:.2f} sparsity {done[kk]['sparsity']:.4f}", flush=True)
            save(done, path)
    write_reports(done, dense, args)


if __name__ == "__main__":
    main()
