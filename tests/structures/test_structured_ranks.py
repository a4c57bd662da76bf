"""prune_structured over 2 gloo processes: every rank removes the units one process fed all the
batches removes and ends with its weights; ranks that disagree stop alike; ``device`` runs
each block where asked and leaves the model where it was."""
import copy
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import prunekit as pk

from helpers.llama_toys import tiny_llama
from helpers.two_ranks import run_two_ranks

WORLD = 2
SNOWS_TINY = {"k": 1, "max_cg": 3, "epochs": 1, "hessian_fraction": 1.0}
CASES = {
    "mlp-wanda-lstsq": {"structures": "mlp", "ratio": 0.5},
    "heads-obs": {"structures": "heads", "ratio": 0.5, "method": "obs"},
    "mlp-global": {"structures": "mlp", "params": 0.3, "budget": "global", "refine": "bias", "bias": True},
    "mlp-snows": {"structures": "mlp", "ratio": 0.5, "refine": "snows", "refine_options": SNOWS_TINY},
}


def _model() -> torch.nn.Module:
    # float64: the ranks' statistics are sums grouped differently from one process's
    return tiny_llama(2).double().eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (2, 16), generator=g) for _ in range(4)]


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test compares what every rank raised
        return f"{type(exc).__name__}: {exc}"
    return None


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out: dict = {}
        for name, options in CASES.items():
            model = _model()
            batches = _batches()
            if name == "mlp-wanda-lstsq":  # every rank passes the full list and keeps its share
                error = _error(lambda: pk.prune_structured(model, batches, shard_calibration=True, progress=False,
                                                           **options))
            else:  # each rank passes its own share
                error = _error(lambda: pk.prune_structured(model, batches[rank::WORLD], progress=False, **options))
            out[name] = {"error": error, "weights": {k: v.clone() for k, v in model.state_dict().items()}}
        model = _model()
        original = copy.deepcopy(model.state_dict())
        out["disagree"] = _error(lambda: pk.prune_structured(model, _batches()[rank::WORLD], ratio=0.25 * (1 + rank),
                                                             progress=False))
        out["short"] = _error(lambda: pk.prune_structured(model, _batches()[:1], ratio=0.5, shard_calibration=True,
                                                          progress=False))
        out["unchanged"] = all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT seen once)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out():
    with tempfile.TemporaryDirectory() as out:
        run_two_ranks(_worker, out, timeout=240, what="prune_structured's gloo")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_remove_what_one_process_on_all_batches_removes(ranks_out, name):
    model, batches = _model(), _batches()
    # one process, each batch the union of the ranks' batches at the same position (SNOWS's
    # Newton steps and held-out batch are then the same problem as the ranks')
    whole = [torch.cat([batches[i + r] for r in range(WORLD)]) for i in range(0, len(batches), WORLD)]
    pk.prune_structured(model, whole, progress=False, **CASES[name])
    ref = model.state_dict()
    assert [r[name]["error"] for r in ranks_out] == [None] * WORLD
    r0, r1 = (r[name]["weights"] for r in ranks_out)
    assert set(r0) == set(ref)
    for key, value in ref.items():
        assert r0[key].shape == value.shape, f"{name}: {key} kept other units"
        assert torch.equal(r0[key], r1[key]), f"{name}: ranks differ in {key}"
        torch.testing.assert_close(r0[key], value, rtol=1e-7, atol=1e-9, msg=f"{name}: {key}")
    assert any(v.shape != _model().state_dict()[k].shape for k, v in ref.items())  # something was removed


def test_ranks_that_disagree_all_stop_naming_the_option(ranks_out):
    errors = [r["disagree"] for r in ranks_out]
    assert errors[0] == errors[1] and errors[0].startswith("ValueError")
    assert "ratio" in errors[0] and "rank 1" in errors[0]


def test_a_rank_left_without_batches_stops_every_rank_and_names_the_fix(ranks_out):
    errors = [r["short"] for r in ranks_out]
    assert all(e is not None and e.startswith("ValueError") for e in errors)
    assert "--batch-size" in errors[1] and "rank 1" in errors[1]
    assert all(r["unchanged"] for r in ranks_out)


def test_device_cpu_prunes_as_without_it():
    a, b = _model(), _model()
    pk.prune_structured(a, _batches(), ratio=0.5, progress=False)
    pk.prune_structured(b, _batches(), ratio=0.5, device="cpu", progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("device", ["meta", "nonsense", "cuda:99"])
def test_a_bad_device_is_refused_naming_it_and_the_model_is_unchanged(device):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="device"):
        pk.prune_structured(model, _batches(), ratio=0.5, device=device, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_model_pruned_on_cuda_matches_the_cpu_run_and_stays_on_the_cpu():
    a, b = _model(), _model()
    pk.prune_structured(a, _batches(), ratio=0.5, progress=False)
    pk.prune_structured(b, _batches(), ratio=0.5, device="cuda", progress=False)
    for key, value in a.state_dict().items():
        assert b.state_dict()[key].device.type == "cpu"
        torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-6, atol=1e-8)
