"""One-shot pruning benchmark on a ResNet trained on real MNIST (``make bench-oneshot``).

Reproduces the ordering claimed by SNOWS (Lucas & Mazumder 2025): SNOWS > layer-wise
(SparseGPT, least squares) > magnitude, most clearly at >= 90% and 1:4, with accuracy not
falling as the lookahead K grows. Every method prunes the same 12 block convolutions (stem and
1x1 shortcuts stay dense, as in the SNOWS reference) with the same calibration images.

``--recalibrate-bn`` also runs every configuration with ``prune(..., recalibrate_bn=True)`` (the
BatchNorm statistics re-estimated on the calibration images after pruning), in rows marked "+BN".

Writes ``benchmarks/results/oneshot.{json,md,png}``; finished runs are cached in the JSON, so
an interrupted benchmark resumes where it stopped.
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
from prunekit.zoo.models import resnet_mnist
from prunekit.zoo.train import accuracy, cached, train_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PATTERNS = ["0.7", "0.8", "0.9", "0.95", "2:4", "1:4"]
BASELINES = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("magnitude", "lstsq")]
SNOWS_KS = [0, 2, 4, 8]
EXCLUDE = r"^0\.|shortcut"


def trained_resnet(seed: int = 0) -> torch.nn.Module:
    x, y = load_mnist("train")

    def train(model):
        torch.manual_seed(seed)
        return train_classifier(model, x, y, epochs=2, lr=0.1, seed=seed)

    torch.manual_seed(seed)
    return cached(f"bench_resnet_mnist_w16_s{seed}", resnet_mnist, train)


# The full K sweep at every setting (set FULL_K to a subset to save time: K = 0 and 8 elsewhere).
# Hardest settings first.
FULL_K = tuple(PATTERNS)
ORDER = ["0.9", "0.95", "1:4", "0.7", "0.8", "2:4"]


def configs() -> list[tuple[str, str, str | None, int | None]]:
    out = []
    for pattern in ORDER:
        out += [(pattern, m, r, None) for m, r in BASELINES]
        ks = SNOWS_KS if pattern in FULL_K else [SNOWS_KS[0], SNOWS_KS[-1]]
        out += [(pattern, m, "snows", k) for m in ("magnitude", "sparsegpt") for k in ks]
    return out


def _k_sweep() -> str:
    if set(FULL_K) == set(PATTERNS):
        return f"SNOWS K in {SNOWS_KS} at every setting"
    return f"SNOWS K in {SNOWS_KS} at {', '.join(FULL_K)}; K in {[SNOWS_KS[0], SNOWS_KS[-1]]} elsewhere"


def key(pattern, method, refine, k, seed, bn=False) -> str:
    return f"{pattern}|{method}|{refine}|{k}|" + ("bn|" if bn else "") + f"{seed}"


def run_one(dense, calibration, x_test, y_test, pattern, method, refine, k, args, bn=False) -> dict:
    model = copy.deepcopy(dense)
    kwargs = {"sparsity": float(pattern)} if ":" not in pattern else {"pattern": pattern}
    snows = {"k": k, "epochs": args.epochs, "max_cg": args.max_cg, "warm_start": "lstsq" if ":" not in pattern else "none"}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pk.prune(model, calibration, method=method, refine=refine, exclude=EXCLUDE,
                          refine_options=snows if refine == "snows" else None, progress=False,
                          recalibrate_bn=bn, **kwargs)
    seconds = time.perf_counter() - start
    row = {"pattern": pattern, "method": method, "refine": refine, "k": k,
           "accuracy": accuracy(model, x_test, y_test), "sparsity": result.sparsity, "seconds": seconds}
    return {**row, "recalibrate_bn": True} if bn else row


def label(r: dict) -> str:
    name = r["method"] + (f"+{r['refine']}" if r["refine"] else "")
    name += f" K={r['k']}" if r["refine"] == "snows" else ""
    return name + (" +BN" if r.get("recalibrate_bn") else "")


def write_reports(rows: list[dict], dense_acc: float, args) -> None:
    by = {}
    for r in rows:
        by.setdefault(label(r), {}).setdefault(r["pattern"], []).append(r)
    names = sorted(by, key=lambda n: (n.split(" ")[0] != "magnitude", "snows" in n, n))
    head = "| method | " + " | ".join(p if ":" in p else f"{float(p):.0%}" for p in PATTERNS) + " |"
    lines = [
        "# One-shot pruning: ResNet (12 block convs) on MNIST, test accuracy %",
        "",
        f"Dense accuracy: {dense_acc:.2f}%. Calibration: {args.calibration} training images, batches of "
        f"{args.batch_size}; SNOWS: {args.epochs} epoch(s), max {args.max_cg} CG iterations, LS warm start "
        f"for unstructured, none for N:M. {_k_sweep()}. Seeds: {args.seeds}. Command: "
        + ("`make bench-oneshot`." if args.out == "oneshot" and not args.only else f"`{_command(args)}`."),
        "Rows marked +BN re-estimate the BatchNorm statistics on the calibration images after pruning "
        "(`--recalibrate-bn`, `prune(..., recalibrate_bn=True)`).",
        "Each cell: mean test accuracy (± std over seeds when > 1) and the mean pruning time in seconds, "
        "measured on a shared 2-core machine with 1 thread; '-' marks a configuration not run.",
        "",
        head,
        "|" + "---|" * (len(PATTERNS) + 1),
    ]
    for n in names:
        cells = []
        for p in PATTERNS:
            rs = by[n].get(p, [])
            if not rs:
                cells.append("-")
                continue
            acc = torch.tensor([r["accuracy"] for r in rs])
            std = f" ± {acc.std():.2f}" if len(rs) > 1 else ""
            cells.append(f"{acc.mean():.2f}{std} ({sum(r['seconds'] for r in rs) / len(rs):.0f}s)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(by, names, dense_acc, args.out)


def _command(args) -> str:
    opts = [f"--only '{args.only}'" if args.only else "", "--recalibrate-bn" if args.recalibrate_bn else "",
            f"--out {args.out}" if args.out != "oneshot" else "", f"--threads {args.threads}"]
    return "python benchmarks/oneshot.py " + " ".join(o for o in opts if o)


def plot(by, names, dense_acc, out="oneshot") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = [p for p in PATTERNS]
    for n in names:
        if "snows" in n and not n.endswith("K=8") and not n.endswith("K=0"):
            continue
        ys = [sum(r["accuracy"] for r in by[n][p]) / len(by[n][p]) if p in by[n] else float("nan") for p in xs]
        axes[0].plot(range(len(xs)), ys, marker="o", label=n)
    axes[0].axhline(dense_acc, color="k", ls=":", label="dense")
    axes[0].set_xticks(range(len(xs)), [p if ":" in p else f"{float(p):.0%}" for p in xs])
    axes[0].set_xlabel("sparsity / pattern")
    axes[0].set_ylabel("test accuracy %")
    axes[0].set_title("accuracy vs sparsity")
    axes[0].legend(fontsize=7)
    for m in ("magnitude", "sparsegpt"):
        for p in ("0.9", "0.95", "1:4"):
            ys = [sum(r["accuracy"] for r in by[f"{m}+snows K={k}"][p]) / len(by[f"{m}+snows K={k}"][p])
                  if p in by.get(f"{m}+snows K={k}", {}) else float("nan") for k in SNOWS_KS]
            axes[1].plot(SNOWS_KS, ys, marker="o", label=f"{m}+snows @ {p}")
    axes[1].set_xlabel("SNOWS lookahead K (operations)")
    axes[1].set_ylabel("test accuracy %")
    axes[1].set_title("accuracy vs K")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{out}.png"), dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration images (default 512)")
    parser.add_argument("--batch-size", type=int, default=128, help="calibration batch = SNOWS mini-batch")
    parser.add_argument("--epochs", type=int, default=1, help="SNOWS epochs (default 1)")
    parser.add_argument("--max-cg", type=int, default=10, help="SNOWS CG iterations per Newton step (default 10)")
    parser.add_argument("--seeds", type=int, default=1, help="calibration seeds (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--only", default=None,
                        help="run only configs whose key contains this (comma-separated: any of these)")
    parser.add_argument("--report-only", action="store_true", help="write the reports from the cached runs")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="also run every configuration with BatchNorm statistics re-estimated after pruning")
    parser.add_argument("--out", default="oneshot",
                        help="base name of the results files in benchmarks/results/ (default oneshot)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    cache_path = os.path.join(RESULTS, f"{args.out}.json")
    done = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    dense = trained_resnet()
    x_train, _ = load_mnist("train")
    x_test, y_test = load_mnist("test")
    dense_acc = accuracy(dense, x_test, y_test)
    for seed in range(0 if args.report_only else args.seeds):
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(100 + seed))[: args.calibration]
        calibration = list(x_train[idx].split(args.batch_size))
        runs = [(*c, False) for c in configs()] + ([(*c, True) for c in configs()] if args.recalibrate_bn else [])
        for pattern, method, refine, k, bn in runs:
            kk = key(pattern, method, refine, k, seed, bn)
            if kk in done or (args.only and not any(part in kk for part in args.only.split(","))):
                continue
            row = run_one(dense, calibration, x_test, y_test, pattern, method, refine, k, args, bn)
            row["seed"] = seed
            done[kk] = row
            print(f"{kk}: acc {row['accuracy']:.2f} sparsity {row['sparsity']:.4f} {row['seconds']:.1f}s", flush=True)
            tmp = cache_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(done, f, indent=1)
            os.replace(tmp, cache_path)
    write_reports(list(done.values()), dense_acc, args)


if __name__ == "__main__":
    main()
