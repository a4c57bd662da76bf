"""Calibration spread over 2 gloo processes: every rank ends with the weights of one process fed
all the batches, bit-identical across ranks; disagreements and failures stop every rank alike."""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import prunekit as pk
from prunekit.oneshot.runtime.ranks import Ranks, checksum, describe_value, fingerprint, _first_difference

from helpers.llama_toys import tiny_llama
from helpers.two_ranks import run_two_ranks

WORLD = 2
# Newton steps that move; every HVP on whole batches (a hessian_fraction < 1 takes the head of each
# rank's own batch, so the HVP rows differ from one process's and only the gradients match exactly)
SNOWS_TINY = {"k": 2, "max_cg": 4, "epochs": 1, "warm_start": "none", "hessian_fraction": 1.0}
# name -> (model, prune() arguments); CNN ranks pass their own shard, llama ranks the full list
CASES = {
    "cnn-sparsegpt": ("cnn", {"method": "sparsegpt", "sparsity": 0.5}),
    "cnn-wanda": ("cnn", {"method": "wanda", "sparsity": 0.5}),
    "cnn-lstsq": ("cnn", {"method": "magnitude", "refine": "lstsq", "sparsity": 0.6}),
    "cnn-snows": ("cnn", {"method": "wanda", "refine": "snows", "sparsity": 0.5, "refine_options": SNOWS_TINY}),
    "cnn-snows-gn": ("cnn", {"method": "wanda", "refine": "snows", "sparsity": 0.5,
                             "refine_options": {**SNOWS_TINY, "hvp": "gauss_newton"}}),
    "llama-sparsegpt": ("llama", {"method": "sparsegpt", "pattern": "2:4"}),
    "llama-wanda": ("llama", {"method": "wanda", "sparsity": 0.5}),
    "llama-lstsq": ("llama", {"method": "wanda", "refine": "lstsq", "sparsity": 0.5}),
    "llama-snows": ("llama", {"method": "sparsegpt", "refine": "snows", "sparsity": 0.5,
                              "refine_options": {"k": 1, "max_cg": 3, "epochs": 1, "hessian_fraction": 1.0}}),
    "llama-snows-gn": ("llama", {"method": "sparsegpt", "refine": "snows", "sparsity": 0.5, "refine_options": {
        "k": 1, "max_cg": 3, "epochs": 1, "hessian_fraction": 1.0, "hvp": "gauss_newton"}}),
    # fused experts: per-expert statistics, an expert's token count differing between the ranks
    "moe-sparsegpt": ("moe", {"method": "sparsegpt", "sparsity": 0.5}),
    "moe-lstsq": ("moe", {"method": "wanda", "refine": "lstsq", "sparsity": 0.5}),
}


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(3), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def _model(kind: str) -> nn.Module:
    # llama in float64: its GQA attention output (o_proj's input) makes least squares so
    # ill-conditioned that float32 products of differently grouped batches already differ by 1e-3
    if kind == "moe":
        pytest.importorskip("transformers")
        from helpers.moe_toys import tiny_moe

        return tiny_moe("mixtral", num_layers=1, experts=4, experts_implementation="eager").double()  # grouped_mm: no float64
    return _cnn() if kind == "cnn" else tiny_llama(2).double()


def _batches(kind: str) -> list[torch.Tensor]:
    """The full calibration list: 4 batches (16 images or 2 sequences of 32 tokens each)."""
    g = torch.Generator().manual_seed(7)
    if kind == "cnn":
        return [torch.randn(16, 3, 6, 6, generator=g) for _ in range(4)]
    return [torch.randint(0, 100, (2, 32), generator=g) for _ in range(4)]


def _failure(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test compares what every rank raised
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out: dict = {}
        for name, (kind, kwargs) in CASES.items():
            model, batches = _model(kind), _batches(kind)
            try:
                if kind == "cnn":  # each rank passes its own shard
                    result = pk.prune(model, batches[rank::WORLD], progress=False, **kwargs)
                else:  # every rank passes the full list
                    result = pk.prune(model, batches, shard_calibration=True, progress=False, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported by the test of this case
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            out[name] = {"weights": {k: v.clone() for k, v in model.state_dict().items()},
                         "processes": result.processes, "error": None}

        # ranks that disagree on the arguments, or on the model
        model = _cnn()
        original = {k: v.clone() for k, v in model.state_dict().items()}
        out["args"] = _failure(lambda: pk.prune(model, _batches("cnn")[rank::WORLD], method="wanda",
                                                sparsity=0.5 + 0.1 * rank, progress=False))
        if rank == 1:
            with torch.no_grad():
                model[2].weight[0, 0, 0, 0] += 1.0
        out["model"] = _failure(lambda: pk.prune(model, _batches("cnn")[rank::WORLD], method="wanda", sparsity=0.5,
                                                 progress=False))
        model.load_state_dict(original)
        # every rank fails alike: each raises its own error, as one process would
        out["alike"] = _failure(lambda: pk.prune(model, _batches("cnn")[rank::WORLD], method="wanda", sparsity=1.5,
                                                 progress=False))
        # one batch for two ranks: rank 1 fails before any collective
        out["short"] = _failure(lambda: pk.prune(model, _batches("cnn")[:1], method="wanda", sparsity=0.5,
                                                 shard_calibration=True, progress=False))

        # rank 1 fails in the third block, once the first was pruned on every rank
        def boom(*_):
            if (model[0].weight == 0).any():
                raise RuntimeError("boom on rank 1")

        handle = model[2].register_forward_hook(boom) if rank == 1 else None
        out["fails"] = _failure(lambda: pk.prune(model, _batches("cnn")[rank::WORLD], method="sparsegpt",
                                                 sparsity=0.5, progress=False))
        if handle is not None:
            handle.remove()
        out["fails"]["unchanged"] = all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT seen once)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out():
    with tempfile.TemporaryDirectory() as out:
        run_two_ranks(_worker, out, timeout=240, what="the gloo")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_all_batches(ranks_out, name):
    kind, kwargs = CASES[name]
    model, batches = _model(kind), _batches(kind)
    # one process, each of its batches the union of the ranks' batches at the same position, so
    # SNOWS's Newton steps and held-out batch are the same problem as the ranks' (stats-only
    # methods only see sums, for which any grouping is the same)
    whole = [torch.cat([batches[i + r] for r in range(WORLD)]) for i in range(0, len(batches), WORLD)]
    result = pk.prune(model, whole, progress=False, **kwargs)
    ref = model.state_dict()
    assert [r[name]["error"] for r in ranks_out] == [None] * WORLD
    r0, r1 = (r[name]["weights"] for r in ranks_out)
    assert ranks_out[0][name]["processes"] == WORLD
    for key, value in ref.items():
        assert torch.equal(r0[key], r1[key]), f"{name}: ranks differ in {key}"
        assert torch.equal(r0[key] == 0, value == 0), f"{name}: masks differ in {key}"
        torch.testing.assert_close(r0[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    assert abs(result.sparsity - result.target_sparsity) < 0.01


def test_ranks_that_disagree_on_the_arguments_all_stop_naming_the_rank_and_argument(ranks_out):
    e0, e1 = (r["args"] for r in ranks_out)
    assert e0 == e1
    assert e0["type"] == "ValueError"
    assert "rank 1 differs from rank 0 in sparsity (0.6 there, 0.5 on rank 0)" in e0["message"]


def test_ranks_that_disagree_on_the_model_all_stop_naming_the_layer(ranks_out):
    e0, e1 = (r["model"] for r in ranks_out)
    assert e0 == e1
    assert e0["type"] == "ValueError"
    assert "rank 1 differs from rank 0 in layers: 2.weight (shape (8, 8, 3, 3), torch.float32, weights checksum" in e0["message"]


def test_ranks_that_all_fail_alike_raise_the_error_of_one_process(ranks_out):
    alone = _failure(lambda: pk.prune(_cnn(), _batches("cnn"), method="wanda", sparsity=1.5, progress=False))
    assert alone["type"] == "ValueError"
    assert [r["alike"] for r in ranks_out] == [alone] * WORLD


def test_a_rank_left_without_batches_stops_every_rank(ranks_out):
    e0, e1 = (r["short"] for r in ranks_out)
    assert e0 == e1
    assert e0["type"] == "ValueError"
    assert e0["message"] == ("rank 1 of 2 failed with ValueError: shard_calibration=True shares 1 calibration batches "
                             "among 2 ranks, leaving rank 1 none; pass at least 2 batches (smaller batches of the same "
                             "samples: a lower batch size; prunekit prune under torchrun splits its batches itself); "
                             "every rank restored its model")


def test_a_rank_that_fails_mid_calibration_stops_every_rank_with_its_error_and_all_restore(ranks_out):
    e0, e1 = (r["fails"] for r in ranks_out)
    assert e0 == e1
    assert e0["type"] == "RuntimeError"
    assert e0["message"].startswith("rank 1 of 2 failed with RuntimeError: boom on rank 1")
    assert e0["unchanged"] is True


# -- one process: the helpers -------------------------------------------------------------

def test_one_process_is_a_world_of_one_whose_collectives_do_nothing():
    ranks = Ranks.current()
    assert (ranks.world, ranks.rank, ranks.active) == (1, 0, False)
    t = torch.ones(3)
    ranks.sum(t)
    assert torch.equal(t, torch.ones(3))
    assert ranks.max(5) == 5
    ranks.same("anything", {"a": 1})  # nothing to compare with


def test_checksum_sees_every_bit_and_position_but_not_the_order_of_summation():
    w = torch.randn(300, 1000)
    assert checksum(w) == checksum(w.clone())
    bumped = w.clone()
    bumped[17, 3] = torch.nextafter(bumped[17, 3], torch.tensor(1e9))
    assert checksum(bumped) != checksum(w)
    assert checksum(w.flip(0)) != checksum(w)
    assert checksum(w.to(torch.float64)) != checksum(w)
    assert checksum(w > 0) == checksum((w > 0).clone())
    assert checksum(w.half()) == checksum(w.half().clone())


def test_fingerprint_has_no_memory_addresses_and_names_the_first_difference():
    def rule(name, module):
        return True

    assert "0x" not in describe_value({"measured": rule})
    layers = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)}
    one = fingerprint({"sparsity": 0.5}, layers, {"a": 0.5, "b": 0.5})
    assert _first_difference(one, dict(one)) is None
    other = fingerprint({"sparsity": 0.5}, layers, {"a": 0.5, "b": 0.7})
    assert _first_difference(one, other) == "budgets: b (0.7 there, 0.5 on rank 0)"
    assert one["layers"]["b.weight"].startswith("shape (2, 4), torch.float32, weights checksum")
    assert _first_difference(one, {**one, "layers": {"a.weight": one["layers"]["a.weight"]}}) == (
        f"layers: b.weight (missing there, {one['layers']['b.weight']} on rank 0)")
