"""Channel pruning of MNIST vision models in one shot (``make bench-structured-vision``).

The zoo's ResNet, MobileNetV1 and ViT (trained once, cached; see ``_vision_common.MODELS``) are
pruned with ``pk.prune_channels`` at 30% and 50% of the multiply-adds removed (``flops=``), every
score x refine x BatchNorm re-estimation off/on, over calibration seeds (a different subset of
the training images each). Each pruned model then gets the same short fine-tune
(``_vision_common.FINETUNE``), as does the dense model for reference. Reported: test accuracy one
shot, with BatchNorm re-estimated, and fine-tuned (mean and spread over seeds). Speed is measured
apart, on a quiet machine, by ``structured_vision_speed.py`` (its batch-64 figures are quoted here
when its results exist). Combinations the installed ``prune_channels`` refuses are skipped with
the reason printed and recorded.

Rows are appended to ``<out>.json`` as they finish (a rerun resumes; ``--fresh`` starts over) and
``<out>.md`` is rewritten each time; ``<out>.png`` at the end (or ``--report`` to redraw from the JSON).
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import math
import os
import shlex
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _vision_common as vc  # noqa: E402
import prunekit as pk  # noqa: E402
from prunekit.zoo.mnist import load_mnist  # noqa: E402
from prunekit.zoo.train import cached, train_classifier  # noqa: E402

OUT = os.path.join(HERE, "results", "structured_vision")
SPEED = os.path.join(HERE, "results", "structured_vision_speed.json")


def trained(name: str) -> nn.Module:
    """The dense model, trained with its spec's recipe on the 50k training images (cached)."""
    spec = vc.MODELS[name]
    x, y = load_mnist("train")

    def train(model):
        return train_classifier(model, x, y, epochs=spec.epochs, lr=spec.lr, seed=0, optimizer=spec.optimizer)

    torch.manual_seed(0)
    return cached(spec.tag, spec.build, train)


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def refusal(model: nn.Module, score: str, refine: str | None) -> str | None:
    """Why the installed ``prune_channels`` refuses this model/score/refine (None: it accepts),
    tried on an untrained copy with one small batch."""
    try:
        pk.prune_channels(copy.deepcopy(model), [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))],
                          flops=0.3, score=score, refine=refine, recalibrate_bn=False)
    except (ValueError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def signature(model: nn.Module) -> str:
    """The model's parameter shapes (latency depends on them only), as a short hash."""
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return hashlib.sha1(shapes.encode()).hexdigest()[:12]


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def restated(key: str, meta: dict) -> bool:
    """True if the refusal ``key`` (``model``, ``model|score|refine`` or ``model|flops|score|refine|seed``)
    falls in the run ``meta`` describes (its models and refines), which states its refusals afresh."""
    parts = key.split("|")
    refine = parts[-2] if len(parts) == 5 else parts[-1]
    return parts[0] in meta.get("models", []) and (len(parts) == 1 or refine in meta.get("refines", []))


def save(state: dict, path: str) -> None:
    """Write ``state`` merged with what is on disk (under a lock), so that runs of different
    models can fill one file side by side; returns nothing, ``state`` becomes the merged one."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load(path)
        disk["skipped"] = {k: v for k, v in disk.get("skipped", {}).items() if not restated(k, state.get("meta", {}))}
        for part in ("rows", "dense", "skipped"):
            state[part] = {**disk.get(part, {}), **state.get(part, {})}
        mine = {r["started"] + r["command"] for r in state.get("runs", [])}
        state["runs"] = [r for r in disk.get("runs", []) if r["started"] + r["command"] not in mine] + state.get("runs", [])
        state["runs"].sort(key=lambda r: r["started"])
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, path)


def run_row(name, dense, calib, flops, score, refine, args) -> dict:
    """Prune a copy (BN statistics as they are), then BN re-estimated on the same calibration
    batches (what ``recalibrate_bn=True`` does last), then the fine-tune."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    result = pk.prune_channels(model, calib, flops=flops, score=score, refine=refine, recalibrate_bn=False)
    row = {"seconds": time.perf_counter() - start, "flops_removed": result.flops_removed,
           "flops_removed_hooks": 1 - vc.macs(model) / vc.macs(dense),
           "params": result.params_after, "signature": signature(model),
           "channels": {r.owner: [r.units_before, r.units_after] for r in result.reports},
           "accuracy": vc.test_accuracy(model, args.test)}
    if has_bn(model):
        pk.recalibrate_batchnorm(model, calib)
        row["accuracy_bn"] = vc.test_accuracy(model, args.test)
    start = time.perf_counter()
    vc.fine_tune(model, args.finetune)
    row["finetune_seconds"] = time.perf_counter() - start
    row["accuracy_ft"] = vc.test_accuracy(model, args.test)
    row["load"] = os.getloadavg()
    return row, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet,mobilenet,vit", help=f"comma list of {','.join(vc.MODELS)}")
    parser.add_argument("--scores", default="l2,bn,wanda,obs", help="comma list; refused ones are skipped")
    parser.add_argument("--refines", default="none,lstsq,snows", help="comma list ('none': no refit)")
    parser.add_argument("--flops", default="0.5,0.3", help="fractions of the multiply-adds to remove")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (a different subset each)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images per seed")
    parser.add_argument("--test", type=int, default=2000, help="test images (the first n of the 10k)")
    parser.add_argument("--ft-steps", type=int, default=vc.FINETUNE.steps, help="fine-tune SGD steps")
    parser.add_argument("--out", default=OUT, help="output path without extension")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in <out>.json")
    parser.add_argument("--report", action="store_true", help="only rewrite the md and plot from <out>.json")
    args = parser.parse_args()
    args.finetune = vc.FineTune(steps=args.ft_steps)
    state = {} if args.fresh else load(args.out + ".json")
    if args.report:
        write_md(state, args.out), plot(state, args.out)
        return
    command = "OMP_NUM_THREADS={} python benchmarks/structured_vision.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "(unset)"), " ".join(shlex.quote(a) for a in sys.argv[1:]))
    state.setdefault("rows", {}), state.setdefault("dense", {})
    state.pop("latency", None)  # measured apart now (structured_vision_speed.py)
    state["skipped"] = {}
    state.setdefault("runs", []).append({"command": command, "load_start": os.getloadavg(),
                                         "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    state["meta"] = {"command": command, "threads": torch.get_num_threads(), "load_start": os.getloadavg(),
                     "calibration": args.calibration, "test": args.test, "finetune": vars(args.finetune),
                     "finetune_text": args.finetune.describe(), "torch": torch.__version__,
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": args.models.split(","),
                     "refines": [str(None if r == "none" else r) for r in args.refines.split(",")]}
    models = args.models.split(",")
    scores = args.scores.split(",")
    refines = [None if r == "none" else r for r in args.refines.split(",")]
    flops_list = [float(f) for f in args.flops.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    plans: dict[str, list] = {}
    for name in models:
        fresh = vc.MODELS[name].build().eval()
        why = refusal(fresh, "l2", None)
        if why:
            state["skipped"][name] = why
            print(f"skip {name}: prune_channels refuses it: {why}", flush=True)
            continue
        plans[name] = []
        for score in scores:
            for refine in refines:
                why = refusal(fresh, score, refine)
                if why:
                    state["skipped"][f"{name}|{score}|{refine}"] = why
                    print(f"skip {name} score={score} refine={refine}: {why}", flush=True)
                else:
                    plans[name].append((score, refine))
    denses = {}
    for name in plans:
        denses[name] = trained(name)
        if name not in state["dense"]:
            ft = vc.fine_tune(copy.deepcopy(denses[name]), args.finetune)
            state["dense"][name] = {"params": sum(p.numel() for p in denses[name].parameters()),
                                    "macs": vc.macs(denses[name]), "bn": has_bn(denses[name]),
                                    "accuracy": vc.test_accuracy(denses[name], args.test),
                                    "accuracy_ft": vc.test_accuracy(ft, args.test), "load": os.getloadavg()}
            print(f"{name} dense: {state['dense'][name]}", flush=True)
            save(state, args.out + ".json")
    for seed in seeds:  # seed-major: an interrupted run still has every setting at fewer seeds
        calib = vc.calibration(seed, args.calibration)
        for flops in flops_list:
            for name, plan in plans.items():
                for score, refine in plan:
                    key = f"{name}|{flops}|{score}|{refine}|{seed}"
                    if key in state["rows"]:
                        continue
                    try:
                        row, _ = run_row(name, denses[name], calib, flops, score, refine, args)
                    except (ValueError, TypeError) as e:
                        state["skipped"][key] = f"{type(e).__name__}: {e}"
                        print(f"skip {key}: {e}", flush=True)
                        continue
                    state["rows"][key] = {"model": name, "target": flops, "score": score, "refine": refine,
                                          "seed": seed, **row}
                    print(key, {k: row[k] for k in ("accuracy", "accuracy_bn", "accuracy_ft", "seconds") if k in row},
                          flush=True)
                    state["runs"][-1]["load_end"] = os.getloadavg()
                    save(state, args.out + ".json")
                    write_md(state, args.out)
    write_md(state, args.out)
    plot(state, args.out)


# -------------------------------------------------------------------------- report
def stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def groups(state: dict) -> dict:
    """Rows by (model, target, score, refine), in the order first run."""
    out: dict = {}
    for r in state.get("rows", {}).values():
        out.setdefault((r["model"], r["target"], r["score"], r["refine"]), []).append(r)
    return out


def speed_rows() -> list[dict]:
    """The rows of ``structured_vision_speed.json`` (measured apart, quiet), or none."""
    if not os.path.exists(SPEED):
        return []
    with open(SPEED) as f:
        return json.load(f)["rows"]


def speedup(model: str, target: float) -> str:
    """The batch-64 speed-up of ``model`` pruned at ``target`` with the plain channel counts
    (``multiple_of=1``, the shapes this grid's rows have), from the speed results."""
    found = [r for r in speed_rows() if r["model"] == model and r["target"] == target and r["multiple_of"] == 1
             and r.get("setup", "l2") == "l2"]
    return f"x{found[0]['b64']['speedup']:.2f}" if found else "-"


def write_md(state: dict, out: str) -> None:
    meta, dense = state.get("meta", {}), state.get("dense", {})
    g = groups(state)
    seeds = sorted({r["seed"] for r in state.get("rows", {}).values()})
    lines = [
        "# Channel pruning of MNIST vision models, one shot + a short fine-tune",
        "",
        "Commands (`make bench-structured-vision` runs the full default grid under `nice -n 10`; a rerun "
        "resumes, skipping rows already in the JSON), with the load average (1/5/15 min) at the start and "
        f"after the last row, on a 2-core machine shared with other jobs (torch {meta.get('torch')}, "
        f"{meta.get('threads')} threads for pruning and fine-tuning):",
        "",
        *[f"- `{r['command']}` (started {r['started']}, load {fmt_load(r.get('load_start'))} -> "
          f"{fmt_load(r.get('load_end'))})" for r in state.get("runs", [])],
        "",
        f"`pk.prune_channels(model, calibration, flops=f, score=..., refine=..., recalibrate_bn=False)` on "
        f"{meta.get('calibration')} training images per calibration seed (seeds {seeds}: a different random subset "
        "each, batches of 64); 'BN re-est.' is then `pk.recalibrate_batchnorm` on the same batches (what "
        "`recalibrate_bn=True` does as its last step). Accuracy: top-1 % on the first "
        f"{meta.get('test')} of the 10k MNIST test images (a subset, to keep the run short on a shared CPU), "
        "mean ± std over seeds (the number of seeds run is in the 'n' column).",
        "",
        f"**Fine-tune (the same for every model, dense included):** {meta.get('finetune_text')}. "
        "It starts from the BN-re-estimated model where there is BatchNorm. In train mode BatchNorm never reads "
        "its running statistics, so the model without re-estimation would take exactly the same steps; only "
        f"its running statistics would differ, by 0.9^{meta.get('finetune', {}).get('steps')} of the difference "
        "at the start, so one fine-tuned figure stands for both. The helpers (models, data, calibration subsets, "
        "fine-tune, accuracy, latency) are `benchmarks/_vision_common.py`, torch only, for peers.",
        "",
        "Speed: measured apart on a quiet machine by `benchmarks/structured_vision_speed.py` "
        "([structured_vision_speed.md](structured_vision_speed.md): dense and pruned alternated in one process, "
        "batch 1 and 64, with the goal's verdict); the b64 column below quotes it for these shapes.",
        "",
        "## Dense models",
        "",
        "| model | parameters | multiply-adds | accuracy % | fine-tuned % |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, d in dense.items():
        lines.append(f"| {name} ({vc.MODELS[name].description}) | {d['params']:,} | {d['macs']:,} | "
                     f"{d['accuracy']:.2f} | {d['accuracy_ft']:.2f} |")
    lines += ["", "## Summary", "", *summary(state)]
    for name in dense:
        lines += ["", f"## {name}", "",
                  "| target | FLOPs removed | score | refine | n | one shot % | + BN re-est. % | fine-tuned % | "
                  "parameters | prune s |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for (model, target, score, refine), rs in sorted(g.items(), key=lambda kv: order(*kv[0][1:])):
            if model != name:
                continue
            bn = stats([r["accuracy_bn"] for r in rs if "accuracy_bn" in r]) if dense[name]["bn"] else "(no BN)"
            lines.append(f"| {target:.0%} | {100 * rs[0]['flops_removed']:.1f}% | {score} | {refine or 'none'} | "
                         f"{len(rs)} | {stats([r['accuracy'] for r in rs])} | {bn} | "
                         f"{stats([r['accuracy_ft'] for r in rs])} | {rs[0]['params']:,} | "
                         f"{sum(r['seconds'] for r in rs) / len(rs):.0f} |")
    skipped = state.get("skipped", {})
    if skipped:
        lines += ["", "## Skipped (refused by the `prune_channels` of the run that tried it)", "",
                  "Each refusal is the one the last run of that model and refine recorded; a later prunekit may "
                  "accept it (a rerun of that model and refine retries and restates it).", ""]
        lines += [f"- `{k}`: {v}" for k, v in skipped.items()]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def summary(state: dict) -> list[str]:
    """One line per model and target: per score/refine, one-shot accuracy (BN re-estimated where
    the model has BatchNorm) -> fine-tuned, seed means; and the batch-64 speed-up."""
    g = groups(state)
    combos = sorted({(s, r) for (_, _, s, r) in g}, key=lambda sr: order(0, *sr))
    lines = ["| model | target | FLOPs removed | " + " | ".join(f"{s}+{r or 'none'}" for s, r in combos)
             + " | b64 speed-up |", "|---|---|---:|" + "---:|" * (len(combos) + 1)]
    for name, d in state.get("dense", {}).items():
        lines.append(f"| {name} | dense | 0% | {d['accuracy']:.2f} -> {d['accuracy_ft']:.2f} (all) | "
                     + " | ".join("" for _ in combos[1:]) + " | x1.00 |")
        for target in sorted({t for (m, t, _, _) in g if m == name}):
            cells, removed = [], ""
            for s, r in combos:
                rs = g.get((name, target, s, r), [])
                removed = removed or (f"{100 * rs[0]['flops_removed']:.1f}%" if rs else "")
                mean = lambda f: sum(x[f] for x in rs) / len(rs)  # noqa: E731
                one = "accuracy_bn" if d["bn"] else "accuracy"
                cells.append(f"{mean(one):.2f} -> {mean('accuracy_ft'):.2f} ({len(rs)})" if rs else "-")
            lines.append(f"| {name} | {target:.0%} | {removed} | " + " | ".join(cells) + f" | {speedup(name, target)} |")
    return lines + ["", "Cells: one-shot test accuracy % (with BatchNorm re-estimated where the model has "
                        "BatchNorm) -> after the fine-tune, means over (n) calibration seeds."]


def order(target: float, score: str, refine: str | None) -> tuple:
    """Table order: target, then scores and refines as listed (unknown ones last)."""
    scores, refines = ["l2", "bn", "wanda", "obs"], [None, "lstsq", "snows"]
    return (target, scores.index(score) if score in scores else 99, score,
            refines.index(refine) if refine in refines else 99, str(refine))


def fmt_load(load) -> str:
    return "/".join(f"{v:.1f}" for v in load) if load else "-"


def plot(state: dict, out: str) -> None:
    """Fine-tuned (solid) and one-shot + BN re-est. (dashed, one shot where no BN) accuracy vs FLOPs
    removed, one panel per model, one line per score/refine; error bars: std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = state.get("dense", {})
    if not dense:
        return
    g = groups(state)
    fig, axes = plt.subplots(1, len(dense), figsize=(5.5 * len(dense), 4.2), squeeze=False)
    for ax, (name, d) in zip(axes[0], dense.items()):
        combos = sorted({(s, r) for (m, _, s, r) in g if m == name}, key=lambda sr: order(0, *sr))
        lowest = 100.0
        for i, (score, refine) in enumerate(combos):
            color = f"C{i}"
            label = f"{score}+{refine or 'none'}"
            for field, style, base in (("accuracy_ft", "-", d["accuracy_ft"]),
                                       ("accuracy_bn" if d["bn"] else "accuracy", "--", d["accuracy"])):
                xs, ys, es = [0.0], [base], [0.0]
                for (m, t, s, r), rs in sorted(g.items(), key=lambda kv: kv[0][1]):
                    if (m, s, r) == (name, score, refine):
                        vals = torch.tensor([float(x[field]) for x in rs], dtype=torch.float64)
                        xs.append(100 * rs[0]["flops_removed"])
                        ys.append(float(vals.mean()))
                        es.append(float(vals.std()) if len(vals) > 1 else 0.0)
                lowest = min(lowest, *ys)
                ax.errorbar(xs, ys, yerr=es, fmt=style + "o", color=color, ms=3, capsize=2,
                            label=label if style == "-" else None)
        ax.set_title(f"{name}: solid fine-tuned, dashed one shot{' + BN' if d['bn'] else ''}", fontsize=9)
        ax.set_xlabel("multiply-adds removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(0.0, lowest - 3), 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
