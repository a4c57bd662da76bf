"""Property tests of ``pk.prune``: a clear error with the model untouched, or exactly the promise.

Hypothesis draws a small model (Linear stacks, Conv2d/Conv1d stacks, residual blocks, attention
blocks with nn.Linear q/k/v/o), a pattern (unstructured, valid and invalid N:M), a sparsity
(edge values and invalid ones), a budget (uniform, global with cap, ERK, overrides), a method
and refit, and calibration data (right and wrong shapes, NaN, empty). Then either

* ``prune`` raises ``ValueError``/``TypeError`` and every state-dict tensor is bit-identical to
  before (required whenever an input was invalid), or
* every pruned layer has exactly ``round(s_l * n_l)`` zeros for its budget ``s_l`` (exactly
  ``M - N`` per group of ``M`` for N:M), nothing else changed, the state-dict keys are the same,
  the outputs are finite, and no hook is left behind.
"""
from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.layers.targets import HEAD_REASON
from helpers.property_settings import examples

ACTS = (nn.Tanh, nn.GELU, nn.SiLU)  # no dead units: every input column carries signal


# -- models ---------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, d: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), act(), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class ToyAttention(nn.Module):
    """Multi-head self-attention from nn.Linear projections, then an MLP (pre-LN-free)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp_in, self.mlp_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(x)))


class Stack(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


WIDTHS = st.sampled_from([3, 4, 5, 6, 8, 8, 12, 16, 16])


@st.composite
def models(draw) -> tuple[nn.Module, tuple[int, ...], tuple[int, ...]]:
    """A model, the shape of one input sample, and a sample shape with one feature too many."""
    kind = draw(st.sampled_from(["mlp", "cnn", "conv1d", "residual", "attention"]))
    act = draw(st.sampled_from(ACTS))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "mlp":
        dims = draw(st.lists(WIDTHS, min_size=2, max_size=4))
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), act()]
        model, shape = nn.Sequential(*layers, nn.Linear(dims[-1], 3)), (dims[0],)
    elif kind in ("cnn", "conv1d"):
        conv = nn.Conv2d if kind == "cnn" else nn.Conv1d
        pool = nn.AdaptiveAvgPool2d(1) if kind == "cnn" else nn.AdaptiveAvgPool1d(1)
        c0, c1, c2 = draw(st.sampled_from([1, 2, 3, 4])), draw(WIDTHS), draw(WIDTHS)
        k = draw(st.sampled_from([1, 2, 3]))
        size = draw(st.integers(3, 6))
        model = nn.Sequential(conv(c0, c1, k, padding=k // 2), act(), conv(c1, c2, 3, stride=draw(st.sampled_from([1, 2])), padding=1),
                              act(), pool, nn.Flatten(), nn.Linear(c2, 3))
        shape = (c0, size, size) if kind == "cnn" else (c0, size)
    elif kind == "residual":
        d = draw(WIDTHS)
        blocks = [Residual(d, draw(WIDTHS), act) for _ in range(draw(st.integers(1, 3)))]
        d_in = draw(WIDTHS)
        model, shape = Stack(nn.Linear(d_in, d), blocks, nn.Linear(d, 3)), (d_in,)
    else:
        heads = draw(st.sampled_from([1, 2]))
        d = heads * draw(st.sampled_from([2, 4, 6]))
        d_in, tokens = draw(WIDTHS), draw(st.integers(1, 4))
        blocks = [ToyAttention(d, heads) for _ in range(draw(st.integers(1, 2)))]
        model, shape = Stack(nn.Linear(d_in, d), blocks, nn.Linear(d, 3)), (tokens, d_in)
    if draw(st.booleans()):  # quantised weights: many exact ties in every score
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    m.weight.copy_(torch.sign(m.weight) * torch.randint(1, 4, m.weight.shape) / 8)
    model.train(draw(st.booleans()))
    feature = 0 if kind in ("cnn", "conv1d") else len(shape) - 1  # channels, or features
    return model, shape, tuple(d + (i == feature) for i, d in enumerate(shape))


# -- arguments ------------------------------------------------------------------------------------
VALID_SPARSITY = st.one_of(st.sampled_from([0, 0.0, 1e-12, 0.01, 0.5, 0.9, 0.999999, 1 - 1e-12]),
                           st.floats(0.0, 1.0, exclude_max=True))
INVALID_SPARSITY = st.sampled_from([-0.1, -1e-12, 1, 1.0, 1.5, math.nan, math.inf, -math.inf, "0.5", True, [0.5]])
INVALID_PATTERNS = st.sampled_from(["0:4", "4:4", "5:4", "2:0", "a:b", "2-4", "", "2:4:8", "-1:4", "unstructured!", 4, 2.4, None])
GOOD_CALIBRATION = ["ok", "tuple", "generator"]
BAD_CALIBRATION = ["wrong-features", "later-wrong", "nan", "inf", "empty", "none", "empty-batch", "int", "bare-tensor"]
# At most one thing is wrong per request, so that a refusal is always attributable.
FAULTS = ["sparsity", "missing-sparsity", "pattern", "nm-sparsity", "budget", "cap", "overrides", "nm-budget",
          "method", "refine", "snows", "calibration", "meta-model"]


@st.composite
def requests(draw, names: list[str], faults: list[str] = FAULTS) -> tuple[dict, str, str]:
    """(keyword arguments of prune() but the model and calibration, calibration kind, fault):
    half the requests are valid, the others have one fault."""
    fault = draw(st.sampled_from(faults)) if faults and draw(st.booleans()) else "none"
    nm = fault in ("nm-sparsity", "nm-budget") or (fault not in ("missing-sparsity",) and draw(st.integers(0, 2)) == 0)
    if nm:
        m = draw(st.sampled_from([2, 4, 4, 8, 3, 5, 7]))
        n = draw(st.integers(1, m - 1))
        pattern = draw(st.sampled_from([f"{n}:{m}", f" {n} : {m} ", pk.NM(n, m)]))
        sparsity = draw(st.sampled_from([None, 1 - n / m]))
        budget, cap, overrides = "uniform", None, None
    else:
        pattern = draw(st.sampled_from(["unstructured", " Unstructured ", pk.Unstructured()]))
        sparsity = draw(VALID_SPARSITY)
        budget = draw(st.sampled_from(["uniform", "global", "erk"]))
        cap = draw(st.sampled_from([None, 0.0, 0.3, 0.9])) if budget == "global" else None
        overrides = {f"^{re.escape(draw(st.sampled_from(names)))}$": draw(VALID_SPARSITY)} if draw(st.booleans()) else None
    method = draw(st.sampled_from(["magnitude", "wanda", "sparsegpt"]))
    refine = draw(st.sampled_from([None, None, "lstsq", "snows"]))
    kwargs = dict(sparsity=sparsity, pattern=pattern, method=method, refine=refine, budget=budget, cap=cap,
                  overrides=overrides, strict=draw(st.booleans()), progress=False,
                  sequential=draw(st.booleans()), capture=draw(st.sampled_from(["chain", "rerun"])),
                  refine_options=draw(st.sampled_from([{"k": 0, "max_cg": 2}, {"k": 1, "max_cg": 3},
                                                       {"k": 2, "max_cg": 1, "epochs": 1}])) if refine == "snows" else None)
    calib = draw(st.sampled_from(GOOD_CALIBRATION))
    if fault == "sparsity":
        kwargs["sparsity"] = draw(INVALID_SPARSITY)
    elif fault == "missing-sparsity":
        kwargs["sparsity"] = None
    elif fault == "pattern":
        kwargs["pattern"] = draw(INVALID_PATTERNS)
    elif fault == "nm-sparsity":
        s = pk.parse_pattern(pattern).sparsity
        kwargs["sparsity"] = draw(st.sampled_from([0.5 if abs(s - 0.5) > 1e-6 else 0.25, 0.0]))
    elif fault == "budget":
        kwargs["budget"] = draw(st.sampled_from(["Global", "bogus", None, ""]))
    elif fault == "cap":
        kwargs.update(budget="global", cap=draw(st.sampled_from([1.0, 1.5, -0.5, math.nan, "0.3"])))
    elif fault == "overrides":
        kwargs["overrides"] = draw(st.sampled_from([{"^no_such_layer$": 0.5}, {"(": 0.5}, {names[0]: 1.0},
                                                    {names[-1]: -0.1}, {names[0]: math.nan}, {names[0]: "0.5"}]))
    elif fault == "nm-budget":
        kwargs.update(draw(st.sampled_from([{"budget": "global"}, {"budget": "erk"}, {"cap": 0.5},
                                            {"overrides": {f"^{re.escape(names[0])}$": 0.0}}])))
    elif fault == "method":
        kwargs["method"] = draw(st.sampled_from(["Wanda", "obs", None, ""]))
    elif fault == "refine":
        kwargs.update(refine=draw(st.sampled_from(["SNOWS", True, "lsq"])), refine_options=None)
    elif fault == "snows":
        kwargs.update(refine="snows", refine_options=draw(st.sampled_from([{"k": -1}, {"k": 1.5}, {"bogus": 1}, "fast",
                                                                   {"warm_start": "magic"}, {"max_cg": 0}, {"epochs": 0},
                                                                   {"shrink": 1.0}, {"cg_tol": 0.0}, {"max_steps": 0}])))
    elif fault == "calibration":
        calib = draw(st.sampled_from(BAD_CALIBRATION))
        if method == "magnitude" and refine is None:  # magnitude alone reads no data
            kwargs["method"] = draw(st.sampled_from(["wanda", "sparsegpt"]))
    return kwargs, calib, fault


def batch(shape, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def calibration(kind: str, shape: tuple[int, ...], wrong: tuple[int, ...], count: int, size: int):
    """Calibration batches of ``kind``; ``wrong`` is a sample shape the model cannot take."""
    ok = [batch(shape, size, i) for i in range(count)]
    return {
        "ok": lambda: ok,
        "tuple": lambda: [(x,) for x in ok],
        "generator": lambda: (x for x in ok),
        "wrong-features": lambda: [batch(wrong, size, 0)],
        "later-wrong": lambda: ok[:1] + [batch(wrong, size, 1)],
        "nan": lambda: ok[:-1] + [ok[-1].index_fill(0, torch.tensor([0]), math.nan)],
        "inf": lambda: [ok[0].index_fill(0, torch.tensor([0]), math.inf)] + ok[1:],
        "empty": lambda: [],
        "none": lambda: None,
        "empty-batch": lambda: [batch(shape, 0, 0)],
        "int": lambda: [torch.ones(size, *shape, dtype=torch.int64)],
        "bare-tensor": lambda: ok[0],
    }[kind]()


def bit_view(t: torch.Tensor) -> torch.Tensor:
    views = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.view(views[t.dtype]) if t.dtype in views else t


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@settings(max_examples=examples(400))
@given(spec=models(), data=st.data())
def test_prune_refuses_cleanly_or_keeps_every_promise(spec, data):
    model, shape, wrong = spec
    include_head = data.draw(st.booleans(), label="include_head")
    names = list(pk.find_targets(model, include_head=include_head))
    kwargs, calib_kind, fault = data.draw(requests(names), label="request")
    kwargs["include_head"] = include_head
    calib = calibration(calib_kind, shape, wrong, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)))
    targets = pk.find_targets(model, include_head=kwargs["include_head"])
    nm = pk.parse_pattern(kwargs["pattern"]) if fault not in ("pattern",) else None
    nm = nm if isinstance(nm, pk.NM) else None
    misfits = [n for n in targets if nm is not None and pk.to_matrix(targets[n].weight).shape[1] % nm.m]
    # the only refusals of a valid request: no layer fits N:M, or strict=True and one does not
    must_refuse = fault != "none" or (nm is not None and (len(misfits) == len(targets) or kwargs["strict"] and misfits))

    if fault == "meta-model":  # weights not materialised
        model = model.to("meta")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = pk.prune(model, calib, **kwargs)
        except (ValueError, TypeError) as exc:
            if fault == "meta-model":
                event("refused: meta-model")
                assert "no weights yet" in str(exc) and all(v.is_meta for v in model.state_dict().values())
                return
            why = "N:M misfit" if "pattern" in str(exc) else "overrides out of reach" if "overrides" in str(exc) else str(exc)
            event(f"refused: {fault}" + (f" ({why})" if fault == "none" else ""))
            after = model.state_dict()
            assert list(after) == list(before)
            assert all(torch.equal(bit_view(after[k]), bit_view(before[k])) for k in before), f"refused ({exc}) but changed the model"
            assert model.training == was_training and hooks_left(model) == 0
            # or a global/ERK budget that cannot honour its overrides
            legit = kwargs["overrides"] and kwargs["budget"] != "uniform" and "overrides" in str(exc)
            assert must_refuse or legit, f"valid request refused: {exc!r}"
            return
    assert not must_refuse, f"accepted a request with a bad {fault}"
    event(f"pruned: {kwargs['method']}+{kwargs['refine']}, {'N:M' if nm else kwargs['budget']}")
    _check_promise(model, before, targets, misfits, result, kwargs, nm, shape)
    assert model.training == was_training and hooks_left(model) == 0


def _weight_key(name: str) -> str:
    """The state-dict key of a target's weight."""
    return f"{name}.weight" if name else "weight"


def _check_promise(model, before, targets, misfits, result, kwargs, nm, shape) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state-dict keys changed"
    pruned = [n for n in targets if n not in misfits]
    changed_ok = {_weight_key(n) for n in pruned}
    for k in before:
        if k not in changed_ok:
            assert torch.equal(bit_view(after[k]), bit_view(before[k])), f"{k} is not a pruned weight but changed"
    assert sorted(r.name for r in result.layers) == sorted(pruned)
    heads = [n for n, why in result.skipped.items() if why == HEAD_REASON]  # left dense by the head rule
    assert sorted(n for n in result.skipped if n not in heads) == sorted(misfits)
    assert not set(heads) & set(targets) and len(heads) <= 1
    if nm is None:
        w0 = {n: before[_weight_key(n)] for n in pruned}
        scores = {n: w.abs() if kwargs["budget"] == "global" else w for n, w in w0.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "per-layer cap ... makes the target unreachable", as prune() said
            per_layer = pk.allocate(scores, kwargs["sparsity"], kwargs["budget"], cap=kwargs["cap"], overrides=kwargs["overrides"])
    reports = {r.name: r for r in result.layers}
    for n in pruned:
        w = targets[n].weight.detach()
        assert torch.isfinite(w).all(), f"{n} has non-finite weights"
        zeros = int((w == 0).sum())
        if nm is not None:
            groups = w.numel() // nm.m
            assert zeros == groups * (nm.m - nm.n), f"{n}: {zeros} zeros, expected {groups * (nm.m - nm.n)} for {nm}"
            assert pk.check_nm(w != 0, nm), f"{n} breaks {nm}"
        else:
            expected = round(per_layer[n] * w.numel())
            assert zeros == expected, f"{n}: {zeros} zeros of {w.numel()}, expected {expected} (s={per_layer[n]})"
        assert reports[n].sparsity == zeros / w.numel()
    if nm is None and kwargs["method"] == "magnitude" and kwargs["refine"] is None and kwargs["budget"] == "global" \
            and not kwargs["overrides"] and kwargs["cap"] is None:
        kept = [before[_weight_key(n)].abs()[targets[n].weight != 0] for n in pruned]
        gone = [before[_weight_key(n)].abs()[targets[n].weight == 0] for n in pruned]
        kept, gone = torch.cat(kept), torch.cat(gone)
        if kept.numel() and gone.numel():
            assert gone.max() <= kept.min(), "global magnitude kept a smaller weight than one it pruned"
    with torch.no_grad():
        out = model(batch(shape, 2, 99))
    assert torch.isfinite(out).all(), "outputs are not finite"


@settings(max_examples=examples(150))
@given(spec=models(), data=st.data())
def test_ctrl_c_anywhere_or_a_failing_data_iterator_leaves_the_model_as_it_was(spec, data):
    model, shape, _ = spec
    include_head = data.draw(st.booleans(), label="include_head")
    kwargs, _, _ = data.draw(requests(list(pk.find_targets(model, include_head=include_head)), faults=[]), label="request")
    kwargs.update(include_head=include_head, strict=False)  # misfit N:M layers are skipped, not refused
    count = data.draw(st.integers(1, 3), label="batches")
    how = data.draw(st.sampled_from(["ctrl-c", "ctrl-c", "iterator"]), label="fault")
    at = data.draw(st.integers(1, 400 if how == "ctrl-c" else count), label="at")
    ok = [batch(shape, 2, i) for i in range(count)]

    def failing_loader():
        for i, x in enumerate(ok):
            if i + 1 == at:
                raise OSError("the data loader died")
            yield x

    calls = [0]

    def interrupt(module, args):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt

    before = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    handle = nn.modules.module.register_module_forward_pre_hook(interrupt) if how == "ctrl-c" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pk.prune(model, failing_loader() if how == "iterator" else ok, **kwargs)
    except (KeyboardInterrupt, OSError) as exc:
        event(f"{type(exc).__name__} during prune")
    except ValueError:  # e.g. no layer fits the drawn N:M pattern
        event("refused before starting")
    else:
        event("finished before the fault")
        return
    finally:
        if handle is not None:
            handle.remove()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(bit_view(after[k]), bit_view(before[k])) for k in before), "interrupted prune changed the model"
    assert model.training == was_training and hooks_left(model) == 0
