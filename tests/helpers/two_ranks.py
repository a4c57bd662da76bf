"""Running a test's worker on two local processes (gloo over loopback), shared by the DDP, FSDP
and sharding tests."""
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker, out: str, *, timeout: float, what: str, poll: float = 2.0) -> None:
    """``worker(rank, port, out)`` on ranks 0 and 1; killed with a TimeoutError after ``timeout`` s."""
    ctx = mp.spawn(worker, args=(free_port(), out), nprocs=2, join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=poll):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what} workers did not finish in {timeout:.0f} s")
