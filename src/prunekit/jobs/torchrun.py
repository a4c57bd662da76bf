"""A recipe run under ``torchrun``: one process group for the job, rank 0 writes the outputs.

``torchrun --nproc-per-node N -m prunekit prune job.yaml`` starts N processes with the
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment set. Each loads the model and the same
calibration list; :func:`prunekit.prune` (or :func:`prunekit.prune_structured`) then keeps every
N-th batch per rank (``shard_calibration``) and sums the statistics, so all ranks end with the same weights. Only
rank 0 writes the output folder; the others wait for it, so the command ends when the output is
complete on every rank.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

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
