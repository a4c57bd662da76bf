"""Calibration spread over processes: the ranks of torch.distributed's default process group.

Under ``torchrun`` (or any initialised default group: gloo on CPU, nccl on GPU) every process
runs ``prune()`` on the same model with its own share of the calibration batches, as
llm-compressor does. The statistics each method needs are summed with ``all_reduce``, so every
rank makes the same choices and ends with the same weights as one process fed all the data.

Failures: every collective here starts with a one-number ``all_reduce`` of "has a rank
failed?". A rank that raises takes part in that exchange from :func:`across_ranks` instead of
its next collective, so the others learn of it at theirs, and every rank raises the same error
(each restoring its model first). The collectives are: :meth:`Ranks.sum`, :meth:`Ranks.max`,
:meth:`Ranks.same` and the failure exchange itself.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, NoReturn, TypeVar

import torch
import torch.distributed as dist

from ...layers.base import kind_of

_AGREED = "_prunekit_ranks_agreed"  # set on an error every rank raises alike
F = TypeVar("F", bound=Callable[..., Any])
SAME_HINT = ("every rank must call prune() on the same model with the same arguments (only the calibration "
             "batches differ)")


class Ranks:
    """The processes pruning together (``world`` of them; this one is ``rank``)."""

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | None = None) -> None:
        self.world, self.rank = world, rank
        self.device = device or torch.device("cpu")  # where the flags travel (CUDA for nccl)

    @classmethod
    def current(cls) -> "Ranks":
        """The default process group if one is initialised with more than one process, else
        this process alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return cls()
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_world_size(), dist.get_rank(), device)

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- collectives ---------------------------------------------------------------------
    def sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the ranks, in place (every rank ends with the same values)."""
        if not self.active:
            return
        self._exchange()
        for t in tensors:
            if t.device == self.device or self.device.type == "cpu":
                dist.all_reduce(t)
            else:  # nccl reduces CUDA tensors only: statistics kept elsewhere travel through it
                moved = t.to(self.device)
                dist.all_reduce(moved)
                t.copy_(moved)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (the argument is consumed)."""
        self.sum(tensor)
        return tensor

    def max(self, value: int) -> int:
        """The largest ``value`` of all ranks."""
        if not self.active:
            return value
        self._exchange()
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def same(self, what: str, fingerprint: Mapping[str, Any], error: type[Exception] = ValueError,
             hint: str = SAME_HINT) -> None:
        """Check that every rank has the same ``fingerprint`` (a mapping of short values, or of
        mappings); otherwise raise ``error`` on every rank, naming the first rank and entry that
        differ from rank 0, followed by ``hint``."""
        if not self.active:
            return
        self._exchange()
        prints: list[Any] = [None] * self.world
        dist.all_gather_object(prints, dict(fingerprint))
        for r, other in enumerate(prints[1:], start=1):
            diff = _first_difference(prints[0], other)
            if diff is not None:
                raise _agreed(error(f"the {self.world} ranks disagree on {what}: rank {r} differs from rank 0 "
                                    f"in {diff}; {hint}"))

    # -- failures ------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> NoReturn:
        """Tell the other ranks that this one failed with ``exc``, then raise the error every
        rank raises (see :meth:`_exchange`)."""
        self._exchange(exc)
        raise AssertionError("unreachable")  # pragma: no cover - _exchange raises when a rank failed

    def _exchange(self, failure: BaseException | None = None) -> None:
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag)
        if int(flag.item()) == 0:
            return
        told: list[Any] = [None] * self.world
        dist.all_gather_object(told, None if failure is None else (_kind(failure), type(failure).__name__, str(failure)))
        failed = [(r, t) for r, t in enumerate(told) if t is not None]
        if failure is not None and len(failed) == self.world and all(t == told[0] for t in told):
            raise _agreed(failure)  # every rank failed alike: its own error, as one process would raise it
        first, (kind, name, message) = failed[0]
        others = [r for r, _ in failed[1:]]
        text = (f"rank {first} of {self.world} failed with {name}: {message}"
                + (f" (ranks {others} failed too)" if others else "") + "; every rank restored its model")
        error = _agreed({"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)(text))
        if isinstance(failure, KeyboardInterrupt):
            raise _agreed(failure)
        raise error from failure


def across_ranks(fn: F) -> F:
    """Decorate a function that every rank calls together: an error on one rank, raised before
    the others' next collective, is told to them there (see :meth:`Ranks.fail`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ranks = Ranks.current()
        if not ranks.active:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if getattr(exc, _AGREED, False):
                raise
            ranks.fail(exc)

    return wrapper  # type: ignore[return-value]


def checksum(tensor: torch.Tensor) -> int:
    """An exact fingerprint of a tensor's bits and positions (integer arithmetic, so the order
    of summation, threads or devices cannot change it)."""
    t = tensor.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    bits = t.view({1: torch.uint8, 2: torch.int16}.get(t.element_size(), torch.int32))
    total, chunk = 0, 1 << 18
    weights = torch.arange(1, min(chunk, bits.numel()) + 1, dtype=torch.int64, device=t.device) % 8191 + 1
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].to(torch.int64)
        total = (total * 31 + int((part * weights[:part.numel()]).sum())) % (2**61 - 1)
    return total


def describe_value(value: Any) -> str:
    """A value as text that is the same in every process (no memory addresses)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def fingerprint(arguments: Mapping[str, Any], layers: Mapping[str, torch.nn.Module],
                budgets: Mapping[str, float]) -> dict[str, Any]:
    """What every rank must agree on before pruning: the arguments, each parameter's shape,
    dtype and checksum (of every layer kind's parameters), and each unit's budget."""
    out: dict[str, Any] = {k: describe_value(v) for k, v in arguments.items()}
    out["layers"] = {f"{n}.{p}": f"shape {tuple(w.shape)}, {w.dtype}, weights checksum {checksum(w)}"
                     for n, m in layers.items() for p, w in kind_of(m).parameters(m).items()}
    out["budgets"] = {k: repr(v) for k, v in budgets.items()}
    return out


def shard(calls: list, ranks: Ranks) -> list:
    """This rank's share of a calibration list every rank holds in full: batches ``i`` with
    ``i % world == rank``."""
    return calls[ranks.rank::ranks.world]


def _first_difference(mine: Mapping[str, Any], other: Mapping[str, Any]) -> str | None:
    for key in list(mine) + [k for k in other if k not in mine]:
        a, b = mine.get(key), other.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = _first_difference(a, b)
            return f"{key}: {inner}"
        return f"{key} ({_short(b)} there, {_short(a)} on rank 0)"
    return None


def _short(value: Any) -> str:
    text = "missing" if value is None else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _kind(exc: BaseException) -> str:
    return next((k.__name__ for k in (ValueError, TypeError) if isinstance(exc, k)), "RuntimeError")


def _agreed(error: Exception) -> Exception:
    setattr(error, _AGREED, True)
    return error
