"""A recipe run under ``torchrun``: one process group for the job, rank 0 writes the outputs.

``torchrun --nproc-per-node N -m prunekit prune job.yaml`` starts N processes with the
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment set. Each loads the model and the same
calibration list; :func:`prunekit.prune` (or :func:`prunekit.prune_structured`) then keeps every
N-th batch per rank (``shard_calibration``) and sums the statistics, so all ranks end with the
same weights. A list with fewer batches than processes is split into smaller batches first
(:func:`split_for_ranks`), so that the command line's default batch size works with any number
of processes. Only rank 0 writes the output folder; the others wait for it, so the command ends
when the output is complete on every rank.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or any launcher that sets
    the torch.distributed environment variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextlib.contextmanager
def process_group(device: str | None) -> Iterator[int]:
    """The default process group for one job: the one already initialised, or one made from
    torchrun's environment (nccl when the job runs on CUDA, gloo otherwise) and destroyed after.
    Yields the number of processes (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_world_size()
        return
    if not launched_by_torchrun():
        yield 1
        return
    cuda = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_world_size()
    finally:
        dist.destroy_process_group()


def is_writer() -> bool:
    """Rank 0 writes (every process, when there is no process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wait_for_writer(written: bool) -> None:
    """Every rank waits here until rank 0 is done writing (``written``: whether it succeeded, as
    rank 0 knows it); the other ranks then raise if it failed. A no-op in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    flag = torch.tensor([1 if written or dist.get_rank() else 0], dtype=torch.int64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item() and dist.get_rank():
        raise RuntimeError("rank 0 failed to write the outputs (its own error says why); nothing was written")


def split_for_ranks(batches: list, world: int) -> list:
    """``batches`` re-batched so that each of ``world`` processes gets at least one: while there
    are fewer batches than processes, the largest is cut in two along its first (sample) axis,
    in place, so the samples and their order stay the same (the summed statistics are those of
    the original list). A list already long enough is returned as it is. Too few samples for
    ``world`` processes is a ValueError naming the options that give more."""
    out = list(batches)
    while len(out) < world:
        sizes = [_samples(b) for b in out]
        i = max(range(len(out)), key=lambda j: sizes[j], default=None)
        if i is None or sizes[i] < 2:
            raise ValueError(
                f"the calibration data holds {sum(sizes)} samples, fewer than the {world} processes torchrun started, "
                "and every process needs at least one; give more samples (--n-sequences or --n-samples, "
                "data.n_sequences / data.n_samples in a recipe) or start fewer processes (--nproc-per-node)")
        out[i:i + 1] = _halves(out[i], sizes[i])
    return out


def _samples(batch: Any) -> int:
    """The number of samples in a batch: the first axis of its first tensor (1 without one)."""
    values = list(batch.values()) if isinstance(batch, Mapping) else (
        list(batch) if isinstance(batch, (tuple, list)) else [batch])
    first = next((v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return 1 if first is None else int(first.shape[0])


def _halves(batch: Any, n: int) -> list:
    """``batch`` cut into its first ``ceil(n / 2)`` and last samples: every tensor with ``n``
    rows is cut, anything else (``use_cache=False``) is kept in both."""
    cut = (n + 1) // 2

    def part(value: Any, k: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[:cut] if k == 0 else value[cut:]
        if isinstance(value, Mapping):
            return {key: part(v, k) for key, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(part(v, k) for v in value)
        return value

    return [part(batch, 0), part(batch, 1)]
