"""Expert pruning of a small mixture-of-experts LM: calibrated scores against random experts.

A byte-level Mixtral (or Qwen2-MoE) built from a config is trained briefly on the pydoc text
(with the router's load-balancing loss, as MoE models are trained), then ``ratio`` of every
layer's experts is removed by ``pk.prune_experts`` with each score, and by drawing the same
number of experts at random (``--seeds`` draws). Measured on the held-out tail of the text:
perplexity (bytes) and the mean KL divergence of the pruned model's next-byte distribution from
the dense model's. Calibration: ``--calib`` sequences of the head of the text (disjoint).

    python benchmarks/structured_moe.py --kind mixtral --ratio 0.25 0.5
Results: benchmarks/results/structured_moe_<kind>.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def byte_sequences(text: str, n: int, length: int, offset: int = 0) -> torch.Tensor:
    data = torch.tensor(list(text.encode("utf-8")[offset:offset + n * length]), dtype=torch.long)
    return data.view(n, length)


def build(kind: str, experts: int, top_k: int):
    import transformers

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=top_k, output_router_logits=True,
                  router_aux_loss_coef=0.01, tie_word_embeddings=False)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=128, num_local_experts=experts, **common))
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=experts,
        **common))


def train(model, data: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(model, dense_logp: list[torch.Tensor] | None, data: torch.Tensor) -> tuple[float, float, list]:
    """(perplexity, mean KL(dense || model) per byte, log-probabilities)."""
    model.eval()
    nll, kl, count, out = 0.0, 0.0, 0, []
    for i, x in enumerate(data.split(8)):
        logp = F.log_softmax(model(x, output_router_logits=False).logits[:, :-1].double(), dim=-1)
        nll -= float(logp.gather(-1, x[:, 1:, None]).sum())
        if dense_logp is not None:
            d = dense_logp[i]
            kl += float((d.exp() * (d - logp)).sum())
        count += x[:, 1:].numel()
        out.append(logp)
    return float(torch.exp(torch.tensor(nll / count))), kl / count, out


def main(argv=None) -> None:
    import prunekit as pk
    from prunekit.structures.experts import find_experts, remove_experts
    from prunekit.structures.surgery import Undo
    from prunekit.zoo.text import pydoc_text, split_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["mixtral", "qwen2_moe"], default="mixtral")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    calib_text, eval_text = split_text(pydoc_text())
    train_data = byte_sequences(calib_text, 4096, args.length, offset=args.calib * args.length)
    calib = list(byte_sequences(calib_text, args.calib, args.length).split(8))
    held_out = byte_sequences(eval_text, args.eval, args.length)

    model = build(args.kind, args.experts, args.top_k)
    t0 = time.perf_counter()
    losses = train(model, train_data, args.steps, batch=16, lr=3e-3)
    train_s = time.perf_counter() - t0
    model.eval()
    dense_ppl, _, dense_logp = evaluate(model, None, held_out)
    print(f"{args.kind}: trained {args.steps} steps in {train_s:.0f} s (loss {statistics.mean(losses[:10]):.2f} -> "
          f"{statistics.mean(losses[-10:]):.2f}); dense held-out perplexity {dense_ppl:.3f}")
    usage = pk.score_experts(model, calib)
    rows = []
    for ratio in args.ratio:
        for method in ("reap", "weight", "frequency"):
            pruned = copy.deepcopy(model)
            result = pk.prune_experts(pruned, calib, ratio=ratio, method=method)
            ppl, kl, _ = evaluate(pruned, dense_logp, held_out)
            routed = statistics.mean(r.routed_removed for r in result.reports)
            rows.append(dict(ratio=ratio, method=method, ppl=ppl, kl=kl, routed_removed=routed,
                             removed=[r.removed for r in result.reports], seconds=result.seconds))
            print(f"  ratio {ratio}: {method:9s} ppl {ppl:8.3f} (x{ppl / dense_ppl:.3f})  KL {kl:.4f}  "
                  f"routed share removed {routed:.1%}  removed {rows[-1]['removed']}")
        draws = []
        g = torch.Generator().manual_seed(1)
        for _ in range(args.seeds):
            pruned = copy.deepcopy(model)
            chosen, routed = [], []
            for site in find_experts(pruned):
                n = round(ratio * site.num_experts)
                removed = sorted(torch.randperm(site.num_experts, generator=g)[:n].tolist())
                keep = [e for e in range(site.num_experts) if e not in removed]
                freq = usage[site.owner].score("frequency")
                routed.append(float(freq[removed].sum() / freq.sum()))
                remove_experts(pruned, site, keep, Undo())
                chosen.append(removed)
            ppl, kl, _ = evaluate(pruned, dense_logp, held_out)
            draws.append(dict(ppl=ppl, kl=kl, routed_removed=statistics.mean(routed), removed=chosen))
        ppls, kls = [d["ppl"] for d in draws], [d["kl"] for d in draws]
        rows.append(dict(ratio=ratio, method="random", ppl=statistics.mean(ppls), ppl_min=min(ppls), ppl_max=max(ppls),
                         kl=statistics.mean(kls), kl_min=min(kls), kl_max=max(kls),
                         routed_removed=statistics.mean(d["routed_removed"] for d in draws), draws=draws))
        print(f"  ratio {ratio}: random    ppl {statistics.mean(ppls):8.3f} [{min(ppls):.3f}, {max(ppls):.3f}]  "
              f"KL {statistics.mean(kls):.4f} [{min(kls):.4f}, {max(kls):.4f}]")
    out = dict(kind=args.kind, experts=args.experts, top_k=args.top_k, steps=args.steps, train_seconds=train_s,
               final_loss=statistics.mean(losses[-10:]), dense_ppl=dense_ppl, calib=args.calib, eval=args.eval,
               length=args.length, seeds=args.seeds,
               usage={k: v.score("frequency").tolist() for k, v in usage.items()}, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"structured_moe_{args.kind}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Expert pruning, byte-level {args.kind} ({args.experts} experts, top-{args.top_k}, 2 layers)", "",
             f"`python benchmarks/structured_moe.py --kind {args.kind}`: trained {args.steps} steps on pydoc bytes "
             f"(loss {out['final_loss']:.2f}); dense held-out perplexity {dense_ppl:.3f} on {args.eval} x "
             f"{args.length} bytes; calibration {args.calib} x {args.length} bytes (disjoint). Random: mean "
             f"[min, max] of {args.seeds} draws.", "",
             "Calibration routing frequency per expert (top-k share, sums to top-k):", ""]
    lines += [f"- {k}: {', '.join(f'{f:.2f}' for f in v)}" for k, v in out["usage"].items()]
    lines += ["", "| experts removed | method | perplexity (x dense) | KL to dense / byte | routed share removed |",
              "|---:|---|---:|---:|---:|"]
    for r in rows:
        spread = f" [{r['ppl_min']:.3f}, {r['ppl_max']:.3f}]" if r["method"] == "random" else ""
        kspread = f" [{r['kl_min']:.4f}, {r['kl_max']:.4f}]" if r["method"] == "random" else ""
        lines.append(f"| {r['ratio']:.0%} | {r['method']} | {r['ppl']:.3f}{spread} (x{r['ppl'] / dense_ppl:.3f}) | "
                     f"{r['kl']:.4f}{kspread} | {r['routed_removed']:.1%} |")
    (RESULTS / f"structured_moe_{args.kind}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
