"""Tables and goals of benchmarks/structured_vision_peer.py from its rows (no torch).

A row is one pruned model: ``tool`` (``prunekit`` / ``torch-pruning``), ``model``, ``target``
(FLOPs fraction asked for), ``importance`` (the score, with the refit for prunekit), ``config``
(torch-pruning's ViT set-up, else None), ``seed`` (calibration draw), the MACs removed by each
counter, ``oneshot_acc``, ``finetuned_acc`` (None if that seed was not fine-tuned) or ``error``.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

GOAL_TARGET = 0.5
GOAL_MARGIN = 10.0
PRUNEKIT_MAIN = "l2+lstsq"


def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(scale * x, spec)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]"


def grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (model, target, tool, importance, config), in the order they first appear."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["target"], r["tool"], r["importance"], r.get("config"))].append(r)
    return out


def summary(group: list[dict]) -> dict:
    """Medians over calibration seeds of one (model, target, tool, importance, config)."""
    ok = [r for r in group if not r.get("error")]
    if not ok:
        return {"error": group[0].get("error")}
    med = lambda k: statistics.median([r[k] for r in ok if r.get(k) is not None]) if any(  # noqa: E731
        r.get(k) is not None for r in ok) else None
    return {"error": None, "oneshot": med("oneshot_acc"), "oneshot_all": [r["oneshot_acc"] for r in ok],
            "finetuned": med("finetuned_acc"), "finetuned_all": [r["finetuned_acc"] for r in ok
                                                                 if r.get("finetuned_acc") is not None],
            "removed_own": med("macs_removed_own"), "removed_tp": med("macs_removed_tp"),
            "removed_hooks": med("macs_removed_hooks"), "params": med("params"), "ratio": med("ratio"),
            "prune_s": med("prune_s"), "seeds": len(ok)}


def table(rows: list[dict]) -> str:
    """The side-by-side markdown table, one line per model x FLOPs target x tool x importance."""
    lines = ["| model | FLOPs target | tool | importance (refit) | ViT config | MACs removed: own count | "
             "tp count | conv+linear hooks | params | one-shot acc % (median [min-max], seeds) | "
             "after fine-tune % | prune s |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, target, tool, imp, config), group in grouped(rows).items():
        s = summary(group)
        head = f"| {model} | {100 * target:.0f}% | {tool} | {imp} | {config or '-'} |"
        if s["error"]:
            lines.append(f"{head} - | - | - | - | refused: {s['error']} | - | - |")
            continue
        lines.append(f"{head} {_pct(s['removed_own'])} | {_pct(s['removed_tp'])} | "
                     f"{_pct(s['removed_hooks'])} | {_fmt(s['params'], ',.0f')} | "
                     f"{_span(s['oneshot_all'])} ({s['seeds']}) | {_span(s['finetuned_all'])} | "
                     f"{_fmt(s['prune_s'], '.1f')} |")
    return "\n".join(lines)


def goals(rows: list[dict], target: float = GOAL_TARGET, margin: float = GOAL_MARGIN) -> list[dict]:
    """Per model, the issue's two goals at ``target`` FLOPs removed: prunekit's one-shot
    ``l2+lstsq`` beats torch-pruning's best one-shot importance by >= ``margin`` points (medians
    over seeds), and after the same fine-tune it is at least as accurate."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        groups = {k: summary(g) for k, g in grouped(rows).items() if k[0] == model and k[1] == target}
        pk = next((s for k, s in groups.items() if k[2] == "prunekit" and k[3] == PRUNEKIT_MAIN), None)
        peers = {k: s for k, s in groups.items() if k[2] == "torch-pruning" and not s["error"]}
        if pk is None or not peers:
            continue
        best_one = max(peers.items(), key=lambda kv: kv[1]["oneshot"])
        ft_peers = {k: s for k, s in peers.items() if s["finetuned"] is not None}
        best_ft = max(ft_peers.items(), key=lambda kv: kv[1]["finetuned"]) if ft_peers else None
        row = {"model": model, "target": target, "peer_best_oneshot": best_one[1]["oneshot"],
               "peer_best_oneshot_by": f"{best_one[0][3]}" + (f" ({best_one[0][4]})" if best_one[0][4] else ""),
               "peer_best_finetuned": best_ft[1]["finetuned"] if best_ft else None,
               "peer_best_finetuned_by": (f"{best_ft[0][3]}" + (f" ({best_ft[0][4]})" if best_ft[0][4] else ""))
               if best_ft else None}
        if pk["error"]:
            row.update(prunekit_error=pk["error"], oneshot_met=False, finetuned_met=False)
        else:
            row.update(prunekit_oneshot=pk["oneshot"], prunekit_finetuned=pk["finetuned"],
                       margin=pk["oneshot"] - best_one[1]["oneshot"],
                       oneshot_met=pk["oneshot"] - best_one[1]["oneshot"] >= margin,
                       finetuned_met=best_ft is not None and pk["finetuned"] is not None
                       and pk["finetuned"] >= best_ft[1]["finetuned"])
        out.append(row)
    return out


def goals_markdown(rows: list[dict]) -> str:
    """The goals as a markdown list, each marked met or missed with the numbers behind it."""
    lines = []
    for g in goals(rows):
        mark = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
        if "prunekit_error" in g:
            lines.append(f"- {g['model']}, {100 * g['target']:.0f}%: one-shot goal {mark(False)}, fine-tune goal "
                         f"{mark(False)}: prunekit's `prune_channels` refuses this model ({g['prunekit_error']}); "
                         f"torch-pruning's best one-shot {g['peer_best_oneshot']:.2f}% ({g['peer_best_oneshot_by']}), "
                         f"after fine-tune {_fmt(g['peer_best_finetuned'])}%.")
            continue
        lines.append(f"- {g['model']}, {100 * g['target']:.0f}%: one-shot {mark(g['oneshot_met'])}: prunekit "
                     f"{g['prunekit_oneshot']:.2f}% vs torch-pruning's best {g['peer_best_oneshot']:.2f}% "
                     f"({g['peer_best_oneshot_by']}), margin {g['margin']:+.2f} points (goal >= +{GOAL_MARGIN:.0f}); "
                     f"after fine-tune {mark(g['finetuned_met'])}: prunekit {_fmt(g['prunekit_finetuned'])}% vs "
                     f"{_fmt(g['peer_best_finetuned'])}% ({g['peer_best_finetuned_by']}).")
    return "\n".join(lines)
