"""Property tests of the training pruners: resuming anywhere is bit-identical, zeros stay zeros.

Hypothesis draws a pruner (``MagnitudePruner`` with a constant / one-shot / cubic / cyclical /
plain-function schedule, unstructured or 2:4, any budget, ``mode`` zero or keep;
``SoftThreshold`` with any threshold schedule and either a final threshold or a target
sparsity; ``STR``), an optimizer (SGD with or without momentum, Nesterov and weight decay, Adam,
AdamW), an optional step-wise learning-rate schedule, a run length and a step at which the run
is checkpointed (model + optimizer + LR scheduler + pruner, through ``torch.save`` /
``torch.load``) and resumed into freshly built objects. Invariants:

* the resumed run ends bit-identical to the uninterrupted one (weights, optimizer state,
  pruner state, final masks);
* under ``MagnitudePruner`` a pruned weight is exactly zero after every ``optimizer.step()``,
  before the pruner runs (no momentum or Adam moment regrows it), and the masks never gain an
  entry inside a cycle;
* ``finalize()`` leaves a plain model (same state-dict keys, no hooks), zero wherever the
  returned masks are off.
"""
from __future__ import annotations

import io
import math

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from helpers.property_settings import examples


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


TARGETS = ["0", "2"]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


@st.composite
def configs(draw) -> dict:
    total = draw(st.integers(3, 16))
    cfg = {"total": total, "resume_at": draw(st.integers(0, total)), "seed": draw(st.integers(0, 2**16))}
    cfg["opt"] = draw(st.sampled_from(["sgd", "sgd-momentum", "sgd-nesterov", "adam", "adamw"]))
    cfg["lr"] = draw(st.sampled_from([0.01, 0.1, 0.5]))
    cfg["wd"] = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1]))
    cfg["lr_step"] = draw(st.sampled_from([None, 2, 5]))  # StepLR(step_size, gamma=0.5)
    kind = cfg["pruner"] = draw(st.sampled_from(["magnitude", "magnitude", "soft", "soft", "str"]))
    if kind == "magnitude":
        cfg["pattern"] = draw(st.sampled_from(["unstructured", "unstructured", "2:4"]))
        final = 0.5 if cfg["pattern"] == "2:4" else draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99]))
        cfg["budget"] = "uniform" if cfg["pattern"] == "2:4" else draw(st.sampled_from(["uniform", "global", "erk"]))
        cfg["mode"] = draw(st.sampled_from(["zero", "keep"]))
        cfg["every"] = draw(st.integers(1, 3))
        sched = draw(st.sampled_from(["constant", "oneshot", "cubic", "cyclical", "function"]))
        if sched == "constant":
            cfg["schedule"] = ("constant", final)
        elif sched == "oneshot":
            cfg["schedule"] = ("oneshot", final, draw(st.integers(0, total)))
        elif sched == "cubic":
            cfg["schedule"] = ("cubic", final, total, draw(st.integers(1, 3)), draw(st.sampled_from([0.0, final / 2])))
        elif sched == "cyclical":
            cfg["schedule"] = ("cyclical", final, total, draw(st.integers(1, 3)), draw(st.integers(1, 2)))
        else:  # any step -> sparsity function: a sawtooth that drops (re-opens masks) every 4 steps
            cfg["schedule"] = ("function", final)
    elif kind == "soft":
        cfg["schedule"] = draw(st.sampled_from(["s_lats", "lats", "exact_lats", "pgh", "constant", "linear", "sine"]))
        cfg["start"] = draw(st.integers(0, total - 1))
        cfg["target"] = draw(st.sampled_from([None, 0.5, 0.9]))
        cfg["budget"] = draw(st.sampled_from(["global", "uniform", "erk"]))
        cfg["control_every"] = draw(st.integers(1, 4))
        cfg["greedy"] = draw(st.booleans())
        cfg["project"] = cfg["target"] is not None and draw(st.booleans())
    else:
        cfg["s_init"] = draw(st.sampled_from([-5.0, -2.0, 0.0]))
    return cfg


def build(cfg: dict, seed: int):
    """Model, optimizer, LR scheduler (or None) and pruner, freshly made."""
    model = make_model(seed)
    params = model.parameters()
    lr, wd = cfg["lr"], cfg["wd"]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=lr, weight_decay=wd),
           "sgd-momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
           "sgd-nesterov": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
           "adam": lambda: torch.optim.Adam(params, lr=lr / 10, weight_decay=wd),
           "adamw": lambda: torch.optim.AdamW(params, lr=lr / 10, weight_decay=wd)}[cfg["opt"]]()
    kind = cfg["pruner"]
    if kind == "magnitude":
        name, final, *rest = cfg["schedule"]
        schedule = {"constant": lambda: pk.Constant(final),
                    "oneshot": lambda: pk.OneShot(final, at=rest[0]),
                    "cubic": lambda: pk.Cubic(final, rest[0], every=rest[1], initial=rest[2]),
                    "cyclical": lambda: pk.Cyclical(final, rest[0], cycles=rest[2], start=0, end=rest[0], every=rest[1]),
                    "function": lambda: (lambda step: final * (step % 4) / 4)}[name]()
        pruner = pk.MagnitudePruner(model, opt, schedule, pattern=cfg["pattern"], budget=cfg["budget"],
                                    mode=cfg["mode"], every=cfg["every"], targets=TARGETS)
    elif kind == "soft":
        total, start = cfg["total"], cfg["start"]
        extra = {"lats": {"steps_per_epoch": 1}, "pgh": {"beta": 0.5}}.get(cfg["schedule"], {})
        if cfg["schedule"] == "exact_lats":
            extra["lr_fn"] = lambda k: lr_at(cfg, k)
        how = {"target_sparsity": cfg["target"]} if cfg["target"] is not None else {"final_threshold": 0.05}
        pruner = pk.SoftThreshold(model, opt, total_steps=total, schedule=cfg["schedule"], start_step=start,
                                  budget=cfg["budget"], control_every=cfg["control_every"], greedy=cfg["greedy"],
                                  project=cfg["project"], targets=TARGETS, **how, **extra)
    else:
        pruner = pk.STR(model, opt, s_init=cfg["s_init"], targets=TARGETS)
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg["lr_step"], gamma=0.5) if cfg["lr_step"] else None
    return model, opt, sched, pruner


def lr_at(cfg: dict, k: int) -> float:
    """The learning rate of the first parameter group at step ``k`` (matching ``build``)."""
    base = cfg["lr"] / (10 if cfg["opt"].startswith("adam") else 1)
    return base * 0.5 ** (k // cfg["lr_step"]) if cfg["lr_step"] else base


def bits(t: torch.Tensor) -> torch.Tensor:
    views = {torch.float64: torch.int64, torch.float32: torch.int32}
    return t.view(views[t.dtype]) if t.dtype in views else t


def same(a, b) -> bool:
    """Deep bit-for-bit equality of nested state dicts (floats compared exactly, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def run(cfg: dict, resume_at: int | None = None):
    """Train ``cfg["total"]`` steps, checkpointing and resuming into new objects at ``resume_at``."""
    model, opt, sched, pruner = build(cfg, cfg["seed"])
    for t in range(cfg["total"] + 1):
        if t == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict(),
                        "sched": sched.state_dict() if sched else None}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)  # the default (weights_only) loader must read a pruner's state
            model, opt, sched, pruner = build(cfg, cfg["seed"] + 1)  # other initial weights
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            if sched:
                sched.load_state_dict(ckpt["sched"])
            pruner.load_state_dict(ckpt["pruner"])
        if t == cfg["total"]:
            break
        x, y = batch(t)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        masks = {n: m.clone() for n, m in pruner.masks().items()} if cfg["pruner"] == "magnitude" else None
        opt.step()
        if masks is None:
            pruner.step()
        else:  # pruned entries untouched by the optimizer (momentum, Adam moments, weight decay)
            for n, keep in masks.items():
                assert not pruner.weights[n][~keep].any(), f"optimizer step {t} regrew pruned weights of {n}"
            s_before = pruner.s_prev
            pruner.step()
            for n, keep in pruner.masks().items():
                assert not pruner.weights[n][~keep].any(), f"step {t}: pruned weights of {n} are not zero"
                if pruner.s_prev >= s_before:  # inside a cycle masks only lose entries
                    assert not (keep & ~masks[n]).any(), f"step {t}: the mask of {n} gained entries inside a cycle"
        if sched:
            sched.step()
    return model, opt, pruner


@settings(max_examples=examples(200))
@given(cfg=configs())
def test_resume_anywhere_is_bit_identical_and_pruned_weights_stay_zero(cfg):
    try:
        build(cfg, 0)
    except ValueError as exc:  # e.g. a cubic ramp too short for its update interval
        event(f"refused: {str(exc)[:40]}")
        return
    event(f"{cfg['pruner']} + {cfg['opt']}" + (f", {cfg['schedule'][0]}" if cfg["pruner"] == "magnitude" else ""))
    m1, o1, p1 = run(cfg)
    m2, o2, p2 = run(cfg, resume_at=cfg["resume_at"])
    assert same(m1.state_dict(), m2.state_dict()), "resumed weights differ"
    assert same(o1.state_dict(), o2.state_dict()), "resumed optimizer state differs"
    assert same(p1.state_dict(), p2.state_dict()), "resumed pruner state differs"

    keys = list(m1.state_dict())
    masks = p1.finalize()
    assert list(m1.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in m1.modules()), "hooks left after finalize"
    for n, keep in masks.items():
        weight = dict(m1.named_modules())[n].weight
        assert not weight[~keep].any(), f"finalize: pruned weights of {n} are not zero"
        if cfg["pruner"] != "magnitude":  # a magnitude mask re-opened at the last step keeps zeros at 0
            assert torch.equal(weight != 0, keep), f"finalize: the masks of {n} are not its non-zeros"
    if cfg["pruner"] == "soft" and cfg["project"]:  # an exact count at the target
        total = sum(k.numel() for _, k in masks.items())
        zeros = sum(int((~k).sum()) for _, k in masks.items())
        if cfg["budget"] == "global":
            assert zeros == round(cfg["target"] * total)
