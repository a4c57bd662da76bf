"""prunekit's ``prune_channels`` beside torch-pruning 1.6.1 on the zoo's MNIST models, one run.

``make bench-structured-vision-peer`` (or ``python benchmarks/structured_vision_peer.py
--peer-python .venv-tp/bin/python``). For each model of ``_vision_common.MODELS`` (trained once and
cached under the same tag structured_vision.py uses): the dense state dict, the calibration
images (512 training images per seed, with labels) and the test split are saved to a work folder;
prunekit prunes with ``pk.prune_channels(model, calib, flops=f, score="l2", refine="lstsq")``
(and the same call with ``refine=None``, to show what the refit adds); then
``benchmarks/peer_torch_pruning_vision.py`` runs in the peer's venv with the same threads and
prunes the same dense model at the same FLOPs targets with torch-pruning's importances, and also
counts prunekit's pruned CNNs with torch-pruning's MAC counter. The ViT goes through the same
``prune_channels`` call (MLP hidden units and attention heads). Every pruned model is scored
one-shot on the 10k test images; for the seeds in ``--finetune-seeds``, copies of the same pruned
model are then fine-tuned with each recipe of ``RECIPES`` (``_vision_common.fine_tune``: the shared
lr 0.01 recipe and the gentle lr 0.001 one; the driver hands both to the peer on its command line,
so both tools get the same recipes, batches and order) and scored again. Rows are written to
``benchmarks/results/structured_vision_peer.json`` and ``.md`` as they finish, with the issue's
goals marked met or missed (one fine-tune verdict per recipe). ``--add-matched --models vit`` keeps
every row there and adds prunekit's rows at the FLOPs fraction (shared hooks count) that each
compared torch-pruning model removed, with an equal-FLOPs verdict (``report.MATCHED_RULE``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_vision_io as io  # noqa: E402
import _peer_vision_report as report  # noqa: E402
import _vision_common as vc  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.zoo.train import cached, train_classifier  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "peer_torch_pruning_vision.py")
#: prunekit's set-ups: label -> ``prune_channels`` keywords besides ``flops=``. A run measures
#: DEFAULT_CONFIGS; ``--add-config LABEL`` adds another's rows to a finished run (the goals are judged
#: for each set-up apart, ``l2+lstsq`` first).
CONFIGS = {"l2+lstsq": {"score": "l2", "refine": "lstsq"},
           "l2 (no refit)": {"score": "l2", "refine": None},
           "obs+lstsq (global)": {"score": "obs", "refine": "lstsq", "budget": "global"},
           # groups ranked by the output error measured per group and width on the seed's calibration images
           # (pk.measure_channel_sensitivity, score obs; its time counts in the prune time)
           "obs+lstsq (global, sensitivity)": {"score": "obs", "refine": "lstsq", "budget": "global",
                                               "sensitivity": "measured"},
           # a stronger ridge (damp=1, against 0.01), chosen on held-out training images for robustness to
           # the lr 0.01 fine-tune (benchmarks/vision_damp_finetune.py)
           "obs+lstsq (global, damp 1)": {"score": "obs", "refine": "lstsq", "budget": "global", "damp": 1.0}}
DEFAULT_CONFIGS = ("l2+lstsq", "l2 (no refit)")
#: Both fine-tunes, applied to copies of the very same pruned models by both tools: the shared recipe
#: (lr 0.01, which lowers the converged dense models) and the gentle one (lr 0.001, chosen on the
#: dense models alone by benchmarks/vision_finetune_lr.py).
RECIPES = [vc.FINETUNE, vc.GENTLE]


def trained(name: str) -> torch.nn.Module:
    """The dense model from prunekit's cache (the tag ``_vision_common`` names), trained with its
    recipe (seed 0) if it is not there yet."""
    spec = vc.MODELS[name]
    x, y = vc.mnist("train")

    def train(model):
        return train_classifier(model, x, y, epochs=spec.epochs, lr=spec.lr, optimizer=spec.optimizer, seed=0)

    torch.manual_seed(0)
    return cached(spec.tag, spec.build, train)


def dense_finetuned(name: str) -> dict[str, float]:
    """The control: test accuracy of the dense model after each fine-tune the pruned ones get."""
    return io.fine_tuned_accuracies(trained(name), RECIPES, *vc.mnist("test"))


def has_drop_in_attention(model: torch.nn.Module) -> bool:
    """True if ``model`` holds prunekit's ``PrunedMultiheadAttention``: the peer's venv, without
    prunekit, cannot unpickle it, and torch-pruning's counter would not count its projections."""
    return any(type(m).__name__ == "PrunedMultiheadAttention" for m in model.modules())


def prunekit_rows(name: str, dense, target: float, seeds: list[int], ft_seeds: set[int], work: str,
                  test, configs=DEFAULT_CONFIGS) -> list[dict]:
    """prunekit's rows for one model and FLOPs target, one set of seeds per label of ``configs``
    (one seed without a refit); seed-``min(seeds)`` models are pickled for counting."""
    rows = []
    base = {"kind": "row", "model": name, "tool": "prunekit", "version": pk.__version__, "config": None,
            "target": target, "threads": torch.get_num_threads(), "macs_hooks_dense": vc.macs(dense),
            "params_dense": sum(p.numel() for p in dense.parameters())}
    for label in configs:
        kwargs = CONFIGS[label]
        refine = kwargs["refine"]
        for seed in seeds if refine else seeds[:1]:  # no refit: one seed, to show what the refit adds
            x, _ = io.read_tensors(work, f"calib_s{seed}")
            model = copy.deepcopy(dense)
            row = {**base, "importance": label, "seed": seed, "finetuned": {}, "error": None}
            start = time.perf_counter()
            try:
                calib, call = list(x.split(64)), dict(kwargs)
                if call.get("sensitivity") == "measured":  # on this seed's images
                    call["sensitivity"] = pk.measure_channel_sensitivity(dense, calib, score=call["score"])
                r = pk.prune_channels(model, calib, flops=target, **call)
            except (ValueError, TypeError) as e:
                rows.append({**row, "error": f"{type(e).__name__}: {e}"})
                break  # the same refusal for every seed
            row.update(prune_s=time.perf_counter() - start, macs_removed_own=r.flops_removed,
                       macs_removed_hooks=1 - vc.macs(model) / base["macs_hooks_dense"],
                       params=sum(p.numel() for p in model.parameters()), oneshot_acc=io.accuracy(model, *test),
                       loadavg=os.getloadavg())
            if has_drop_in_attention(model):
                row["tp_count_note"] = "not counted: torch-pruning's counter does not know PrunedMultiheadAttention"
            elif seed == min(seeds):
                row["pickle"] = f"pk_{name}_{target}_{hashlib.md5(label.encode()).hexdigest()[:8]}_s{seed}.pt"
                torch.save(model, os.path.join(work, row["pickle"]))
            if seed in ft_seeds:
                row["finetuned"] = io.fine_tuned_accuracies(model, RECIPES, *test)
            rows.append(row)
            print(f"prunekit {name} {target} {label} s{seed}: removed {100 * r.flops_removed:.1f}% one-shot "
                  f"{row['oneshot_acc']:.2f} fine-tuned {row['finetuned']}", flush=True)
    return rows


def matched_fractions(rows: list[dict], model: str) -> dict[float, str]:
    """The FLOPs fractions (shared hooks count) that the torch-pruning models compared at the goal's
    target removed, each with the compared set-ups that removed it (one-shot best, best per recipe)."""
    out: dict[float, list[str]] = {}
    for g in report.goals(rows):
        if g["model"] != model:
            continue
        pairs = [(g["peer_best_oneshot_removed"], g["peer_best_oneshot_by"])]
        pairs += [(f["peer_best_removed"], f["peer_best_by"]) for f in g["finetuned"].values() if f["peer_best_by"]]
        for removed, by in pairs:
            out.setdefault(removed, [])
            if by not in out[removed]:
                out[removed].append(by)
    return {f: ", ".join(by) for f, by in out.items() if f is not None}


def same_dense(name: str, recorded: dict, seeds: list[int], work: str):
    """The cached dense model (SystemExit if it is not the one ``recorded`` rows were measured on),
    with its calibration and test inputs written to ``work``; returns it and the test tensors."""
    dense = trained(name)
    md5 = hashlib.md5(open(vc.cache_path(name), "rb").read()).hexdigest()
    if md5 != recorded["cache_md5"]:
        raise SystemExit(f"{name}: the cached dense model differs from the one the rows were measured on")
    io.write_inputs(work, name, dense, seeds)
    return dense, io.read_tensors(work, "test")


def add_matched(args, seeds: list[int], ft_seeds: set[int], work: str) -> None:
    """Append to ``args.out`` prunekit's rows at the FLOPs fraction each compared torch-pruning model
    removed (``report.MATCHED_RULE``), for ``args.models``; every row already there is kept."""
    with open(args.out) as f:
        old = json.load(f)
    start = {"command": " ".join(["python", os.path.relpath(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]]),
             "threads": args.threads, "loadavg_start": os.getloadavg(), "rule": report.MATCHED_RULE}
    rows = old["rows"]
    for name in args.models.split(","):
        dense, test = same_dense(name, old["dense"][name], seeds, work)
        rows = [r for r in rows if not (r.get("matched") and r["model"] == name)]  # a rerun replaces them
        for fraction, by in matched_fractions(rows, name).items():
            new = prunekit_rows(name, dense, fraction, seeds, ft_seeds, work, test)
            for r in new:
                r["matched"] = {"target": report.GOAL_TARGET, "peer": by, "peer_removed_hooks": fraction}
            last = max(i for i, r in enumerate(rows) if r["model"] == name and r["tool"] == "prunekit")
            rows = rows[:last + 1] + new + rows[last + 1:]
            old["meta"]["matched_runs"] = [m for m in old["meta"].get("matched_runs", []) if m["command"] != start["command"]]
            old["meta"]["matched_runs"].append({**start, "loadavg_end": os.getloadavg(),
                                                "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
            old["rows"] = rows
            write(args.out, old["meta"], old["dense"], rows, keep_end=True)


def add_config(args, seeds: list[int], ft_seeds: set[int], work: str) -> None:
    """Append to ``args.out`` prunekit's rows of the set-up ``args.add_config`` (a label of CONFIGS)
    for ``args.models`` at every FLOPs target of the run (not the matched ones), with
    ``--finetune-seeds`` if given; a rerun replaces that set-up's rows, every other row is kept."""
    with open(args.out) as f:
        old = json.load(f)
    label, rows = args.add_config, old["rows"]
    start = {"command": " ".join(["python", os.path.relpath(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]]),
             "config": label, "threads": args.threads, "loadavg_start": os.getloadavg(), "why": args.why,
             "finetune_seeds": sorted(ft_seeds)}
    for name in args.models.split(","):
        dense, test = same_dense(name, old["dense"][name], seeds, work)
        targets = list(dict.fromkeys(r["target"] for r in rows if r["model"] == name and not r.get("matched")))
        rows = [r for r in rows if not (r["model"] == name and r["tool"] == "prunekit" and r["importance"] == label)]
        for target in targets:
            new = prunekit_rows(name, dense, target, seeds, ft_seeds, work, test, configs=(label,))
            for r in new:
                r.pop("pickle", None)  # counted by the shared hooks only (no peer run here)
            last = max(i for i, r in enumerate(rows) if r["model"] == name and r["tool"] == "prunekit"
                       and r["target"] == target and not r.get("matched"))
            rows = rows[:last + 1] + new + rows[last + 1:]
            runs = [m for m in old["meta"].get("config_runs", []) if m["command"] != start["command"]]
            old["meta"]["config_runs"] = runs + [{**start, "loadavg_end": os.getloadavg(),
                                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}]
            old["rows"] = rows
            write(args.out, old["meta"], old["dense"], rows, keep_end=True)


def configs_md(meta: dict, rows: list[dict]) -> str:
    """The goals judged again for each set-up added by ``--add-config`` (empty without one)."""
    out = []
    for run in meta.get("config_runs", []):
        label = run["config"]
        out.append(f"""
### The same goals with prunekit's `{label}`

`pk.prune_channels(model, calib, flops=f, {', '.join(f'{k}={v!r}' for k, v in CONFIGS[label].items())})`,
added to this run by `{run['command']}` ({run['threads']} threads, load average {run['loadavg_start'][0]:.1f}
at the start, {run['loadavg_end'][0]:.1f} at the end, finished {run['finished']}; every other row kept
as it was; fine-tuned for calibration seeds {run['finetune_seeds']}, the median over them judged).
{('Why this set-up: ' + run['why']) if run.get('why') else ''}

{report.goals_markdown(rows, label) or '- not measured yet'}
""")
    return "".join(out)


def recipes_meta() -> list[dict]:
    """The fine-tune recipes as the results record them: fields, label and description."""
    return [{**dataclasses.asdict(r), "label": r.label, "describe": r.describe()} for r in RECIPES]


def attach_counts(rows: list[dict], counts: list[dict], dense_tp: dict[str, float]) -> None:
    """Give prunekit's pickled rows torch-pruning's MAC count (``macs_removed_tp``)."""
    by_file = {c["file"]: c["macs_tp"] for c in counts}
    for r in rows:
        if r.get("pickle") in by_file and r["model"] in dense_tp:
            r["macs_removed_tp"] = 1 - by_file[r["pickle"]] / dense_tp[r["model"]]


def matched_md(rows: list[dict]) -> str:
    """The equal-FLOPs goals section of the .md (empty without matched rows)."""
    if not any(r.get("matched") for r in rows):
        return ""
    return f"""
## Goals at equal FLOPs

Where torch-pruning's compared model removed less than the target, prunekit is run again at the
fraction that model removed. The rule, fixed before these rows were measured: {report.MATCHED_RULE}

{report.matched_goals_markdown(rows) or '- not measured yet'}
"""


def write(out: str, meta: dict, dense: dict, rows: list[dict], keep_end: bool = False) -> None:
    """Rewrite the JSON and markdown results from everything measured so far (``keep_end``:
    re-rendering a finished run, whose end load and time stay as they were)."""
    if not keep_end:
        meta = {**meta, "loadavg_end": os.getloadavg(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with open(out, "w") as f:
        json.dump({"meta": meta, "dense": dense, "rows": rows, "goals": report.goals(rows),
                   "matched_goals": report.matched_goals(rows)}, f, indent=1)
    earlier = "".join(
        f"\n\nRows of {', '.join(run.get('models', []))} come from an earlier run of the same script: `{run['command']}` "
        f"({run.get('threads')} threads, load average {run['loadavg_start'][0]:.1f} at the start, "
        f"{run['loadavg_end'][0]:.1f} at the end, finished {run.get('finished')})." for run in meta.get("earlier_runs", []))
    earlier += "".join(f"\n\nNote: {note}" for note in meta.get("notes", []))
    earlier += "".join(
        f"\n\nThe rows matched to torch-pruning's FLOPs (a `matched to` note in the importance column) come from "
        f"`{run['command']}` ({run['threads']} threads, load average {run['loadavg_start'][0]:.1f} at the start, "
        f"{run['loadavg_end'][0]:.1f} at the end, finished {run['finished']}), which kept every other row as it was."
        for run in meta.get("matched_runs", []))
    labels = [r["label"] for r in meta["finetune_recipes"]]
    dense_lines = "\n".join(
        f"| {n} | `{d['tag']}` | {d['description']} | {d['accuracy']:.2f} | "
        + "".join(f"{d['finetuned_accuracies'][k]:.2f} | " for k in labels)
        + f"{d['macs_hooks']:,} | {d.get('macs_tp', float('nan')):,.0f} | {d['params']:,} |" for n, d in dense.items())
    recipes_md = "\n".join(f"  - `{r['label']}`: {r['describe']}" for r in meta["finetune_recipes"])
    md = f"""# prunekit `prune_channels` vs torch-pruning {meta['versions'].get('torch-pruning')}: MNIST models, one shot and fine-tuned

Command: `{meta['command']}`, {meta['threads']} threads in both processes, load average
{meta['loadavg_start'][0]:.1f} at the start, {meta['loadavg_end'][0]:.1f} at the end (a 2-core
machine shared with other jobs: pruning seconds are indicative only). Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.{earlier}

Each tool prunes the same dense model (state dict handed over by file) from the same 512
calibration images per seed (seeds {meta['seeds']}); accuracy on the 10k MNIST test images,
one-shot (median [min-max] over seeds) and after each of two fine-tunes (calibration seed(s)
{meta['finetune_seeds']} only), each applied by both tools to a copy of the very same pruned model:

{recipes_md}

  The shared recipe `{labels[0]}` lowers the converged dense models (the control columns below), so
  a pruned model that is still close to its dense one loses by it too; the gentle recipe's LR was
  chosen on the dense models alone, before any pruned model was fine-tuned with it
  ([vision_finetune_lr.md](vision_finetune_lr.md): the largest LR below 0.01 that lowers no dense
  model by more than 0.1 points).

- prunekit: `pk.prune_channels(model, calib, flops=f, score="l2", refine="lstsq")` (BatchNorm
  re-estimated on the calibration images, its default); `l2 (no refit)` is the same call with
  `refine=None`. `flops=f` removes at least `f` (the smallest uniform ratio that does).
- torch-pruning: `tp.pruner.MetaPruner`, `global_pruning=False`, `iterative_steps=1`, the classifier
  `fc` ignored, `pruning_ratio` searched (a scan by 0.05, then bisection to 0.002 around the first
  crossing: `benchmarks/_ratio_search.py`) for the MACs removed,
  counted by `tp.utils.count_ops_and_params`, closest to `f`; importances `l2` =
  `MagnitudeImportance(p=2)`, `bn` = `BNScaleImportance()`, `taylor` = `TaylorImportance()` on
  the gradients of the cross-entropy summed over the calibration batches (eval mode). ViT: `example`
  follows torch-pruning's torchvision ViT example (`round_to` = heads; the embedding width shrinks),
  `num_heads` passes `num_heads={{mha: mha.num_heads}}` (the embedding width then stays).
- ViT: the same `prune_channels` call as the CNNs. It prunes each block's MLP hidden units and
  attention heads (each `nn.MultiheadAttention` becomes prunekit's `PrunedMultiheadAttention`, same
  `state_dict` keys) and keeps the residual stream's width (LayerNorm couples it). torch-pruning's
  `example` set-up shrinks the embedding width instead; `num_heads` keeps it and prunes only the MLP
  hidden units.
- torch-pruning reaches a FLOPs target only as closely as its channel counts allow (its ratio
  applies to every group); prunekit's `flops=f` is a floor. The columns below say what each removed.
- MACs removed: "own count" is each tool's own claim (prunekit's `flops_removed`, torch-pruning's
  counter), "tp count" is torch-pruning's counter on both tools' models (not on prunekit's ViTs: the
  peer's venv has no prunekit to unpickle `PrunedMultiheadAttention`, and torch-pruning's counter
  does not know that module), "shared hooks" is `_vision_common.macs` on both tools' models: every
  Conv2d and Linear plus each attention's q/k/v projections, its two products and `out_proj`
  (biases, norms, activations and the softmax not counted).

Dense models:

| model | cache tag | architecture | accuracy % | {' | '.join(f'after fine-tune {k} % (control)' for k in labels)} | MACs (shared hooks) | MACs (tp count) | params |
|---|---|---|---:|{'---:|' * len(labels)}---:|---:|---:|
{dense_lines}

{report.table(rows)}

## Goals (issue 22)

At {100 * report.GOAL_TARGET:.0f}% of the FLOPs removed, prunekit one-shot with the refit beats
torch-pruning's best one-shot importance by at least {report.GOAL_MARGIN:.0f} accuracy points on each
model, and after the same fine-tune it is at least as accurate (one verdict per recipe; each tool
aims at the target by its own count, the columns above say what each removed):

{report.goals_markdown(rows) or '- not measured yet'}
{configs_md(meta, rows)}{matched_md(rows)}"""
    with open(out[:-5] + ".md" if out.endswith(".json") else out + ".md", "w") as f:
        f.write(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=os.path.join(HERE, os.pardir, ".venv-tp", "bin", "python"))
    parser.add_argument("--models", default="resnet,mobilenet,vit")
    parser.add_argument("--flops", default="0.5,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--finetune-seeds", default=None, help="calibration seeds whose models are fine-tuned "
                        "(default 0; with --add-config: the run's)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--work", default=None, help="folder for the hand-over files (default: a temporary one)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "structured_vision_peer.json"))
    parser.add_argument("--keep-other-models", action="store_true",
                        help="keep the rows of models not in --models from an earlier run in --out")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON in --out")
    parser.add_argument("--note", action="append", default=[], help="with --render: a note to add to the results")
    parser.add_argument("--add-matched", action="store_true",
                        help="keep every row in --out and add prunekit's rows of --models at the FLOPs each "
                             "compared torch-pruning model removed (same seeds as those rows)")
    parser.add_argument("--add-config", choices=[c for c in CONFIGS if c not in DEFAULT_CONFIGS],
                        help="keep every row in --out and add prunekit's rows of this set-up for --models (same "
                             "seeds and targets; --finetune-seeds if given, else the run's)")
    parser.add_argument("--why", default="", help="with --add-config: how the set-up was chosen (quoted in the .md)")
    args = parser.parse_args()
    if args.add_config:
        with open(args.out) as f:
            meta = json.load(f)["meta"]
        torch.set_num_threads(args.threads)
        ft = {int(s) for s in args.finetune_seeds.split(",") if s} if args.finetune_seeds else set(meta["finetune_seeds"])
        add_config(args, meta["seeds"], ft, args.work or tempfile.mkdtemp(prefix="vision_peer_"))
        return
    if args.add_matched:
        with open(args.out) as f:
            meta = json.load(f)["meta"]
        torch.set_num_threads(args.threads)
        add_matched(args, meta["seeds"], set(meta["finetune_seeds"]),
                    args.work or tempfile.mkdtemp(prefix="vision_peer_"))
        return
    if args.render:
        with open(args.out) as f:
            old = json.load(f)
        torch.set_num_threads(args.threads)
        for name, info in old["dense"].items():  # the controls, for results measured before they existed
            if "finetuned_accuracies" not in info:
                info["finetuned_accuracies"] = dense_finetuned(name)
                info["finetuned_accuracies_note"] = f"measured by --render, load {os.getloadavg()[0]:.1f}"
        old["meta"].setdefault("finetune_recipes", recipes_meta())
        old["meta"]["notes"] = old["meta"].get("notes", []) + args.note
        write(args.out, old["meta"], old["dense"], old["rows"], keep_end=True)
        return
    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="vision_peer_")
    seeds = [int(s) for s in args.seeds.split(",")]
    ft_seeds = {int(s) for s in (args.finetune_seeds or "0").split(",") if s}
    peer_versions = subprocess.run(
        [args.peer_python, "-c", "import importlib.metadata as m, torch, torch_pruning as tp; "
                                 "print(m.version('torch-pruning'), torch.__version__, tp.__version__)"],
        check=True, capture_output=True, text=True).stdout.split()
    meta = {"command": " ".join(["python", os.path.relpath(sys.argv[0])] + [shlex.quote(a) for a in sys.argv[1:]]),
            "threads": args.threads, "seeds": seeds, "finetune_seeds": sorted(ft_seeds),
            "finetune_recipes": recipes_meta(), "loadavg_start": os.getloadavg(), "machine": platform.processor() or platform.machine(),
            "versions": {"prunekit": pk.__version__, "torch (prunekit venv)": torch.__version__,
                         "torch-pruning": peer_versions[0], "torch-pruning's __version__ string": peer_versions[2],
                         "torch (peer venv)": peer_versions[1], "python": platform.python_version()}}
    pk_rows: list[dict] = []
    dense_info: dict[str, dict] = {}
    names = args.models.split(",")
    kept: list[dict] = []
    if args.keep_other_models and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        kept = [r for r in old["rows"] if r["model"] not in names]
        dense_info.update({n: d for n, d in old["dense"].items() if n not in names})
        meta["earlier_runs"] = old["meta"].get("earlier_runs", []) + [
            {k: old["meta"][k] for k in ("command", "models", "threads", "loadavg_start", "loadavg_end", "finished")
             if k in old["meta"]}]
    meta["models"] = names
    for name in names:
        dense = trained(name)
        io.write_inputs(work, name, dense, seeds)
        test = io.read_tensors(work, "test")
        dense_info[name] = {"tag": vc.MODELS[name].tag, "description": vc.MODELS[name].description,
                            "accuracy": io.accuracy(dense, *test), "macs_hooks": vc.macs(dense),
                            "params": sum(p.numel() for p in dense.parameters()),
                            "finetuned_accuracies": dense_finetuned(name),
                            "cache_md5": hashlib.md5(open(vc.cache_path(name), "rb").read()).hexdigest()}
    for name in names:  # rows of an earlier run in the same work folder are not this run's
        if os.path.exists(os.path.join(work, f"peer_{name}.jsonl")):
            os.remove(os.path.join(work, f"peer_{name}.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    peer_cmd = [args.peer_python, PEER, "--work", work, "--threads", str(args.threads),
                "--finetune-recipes", io.recipes_to_arg(RECIPES)]
    # The peers run beside prunekit (one process per model), under the same load as it.
    peers = {name: subprocess.Popen(peer_cmd + ["--model", name, "--flops", args.flops, "--seeds", args.seeds,
                                                "--finetune-seeds", ",".join(map(str, sorted(ft_seeds))),
                                                "--out", os.path.join(work, f"peer_{name}.jsonl")], env=env)
             for name in names}

    def gather() -> list[dict]:
        peer = [r for name in names for r in io.read_rows(os.path.join(work, f"peer_{name}.jsonl"))]
        for r in peer:
            r.setdefault("macs_removed_own", r.get("macs_removed_tp"))
            dense_info[r["model"]].setdefault("macs_tp", r.get("macs_tp_dense"))
        counts = io.read_rows(os.path.join(work, "counts.jsonl"))
        attach_counts(pk_rows, counts, {n: d["macs_tp"] for n, d in dense_info.items() if d.get("macs_tp")})
        return kept + pk_rows + peer

    for target in (float(f) for f in args.flops.split(",")):
        for name in names:
            pk_rows.extend(prunekit_rows(name, trained(name), target, seeds, ft_seeds, work, test))
            write(args.out, meta, dense_info, gather())
    pickles = [os.path.join(work, r["pickle"]) for r in pk_rows if r.get("pickle")]
    subprocess.run(peer_cmd + ["--out", os.path.join(work, "counts.jsonl"), "--count", *pickles], env=env, check=True)
    for name, proc in peers.items():
        if proc.wait():
            pk_rows.append({"kind": "row", "model": name, "tool": "torch-pruning", "target": float(args.flops.split(",")[0]),
                            "importance": "-", "error": f"the peer exited with status {proc.returncode}"})
    rows = gather()
    write(args.out, meta, dense_info, rows)
    print(report.table(rows))
    print(report.goals_markdown(rows))


if __name__ == "__main__":
    main()
