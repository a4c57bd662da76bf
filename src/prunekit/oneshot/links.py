"""Where the chain of blocks holds: which block's inputs the previous block's outputs give.

``capture="chain"`` feeds block ``b + 1`` the output of block ``b`` as its first argument, with
``b``'s other arguments unchanged (:func:`.blocks.propagate`). That is the model's own forward
only where the model does the same. It does not where one stack ends and the next begins (a
decoder's first block takes the embedded decoder inputs, and the encoder's output as its
``encoder_hidden_states``), nor where a block's other arguments change (T5's second block gets
the position bias the first one computed; a model alternating sliding-window and full attention
passes each block its own mask). One hooked forward of the first calibration batch compares,
at every block, the call the chain would make with the call the model makes (tensors by
identity or equal values, cache arguments ignored). A block where they differ is a *start*:
its inputs are captured by re-running the model, whose blocks before it are already pruned,
so a decoder is calibrated on the pruned encoder's outputs. The first block is always a start,
and every block is one under ``capture="rerun"``.

The same forward checks ``blocks=``: a block the forward never calls, or blocks listed out of
the order the forward calls them, is a ValueError naming the block and the fix, raised before
any weight changes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..calls import StopForward
from .blocks import CACHE_KWARGS, first_output


class ChainCheck:
    """Hooks on ``blocks`` while one forward runs (a context manager), then :meth:`starts`.

    Only one block's inputs and output are held at a time. Once every block has run, the
    forward is stopped (what follows, e.g. an LM head, is not needed)."""

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        self.blocks = list(blocks)
        self.order: list[int] = []  # blocks by their first call
        self.linked = [False] * len(self.blocks)
        self.done = 0
        self._pending: dict[int, tuple[tuple, dict]] = {}
        self._last: tuple[int, tuple[tuple, dict]] | None = None  # the block that returned last, and its chained call
        self._handles: list[Any] = []

    def __enter__(self) -> "ChainCheck":
        for i, (_, block) in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._before(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._after(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._pending, self._last = [], {}, None

    def _before(self, i: int):
        def hook(_module, args, kwargs):
            if i in self.order:
                return  # a block run again (weights shared): its first call is the one captured
            self.order.append(i)
            call = (tuple(args), _without_cache(kwargs))
            if self._last is not None and self._last[0] == i - 1:
                self.linked[i] = same(self._last[1], call)
            self._pending[i] = call
        return hook

    def _after(self, i: int):
        def hook(_module, _args, _kwargs, output):
            if i not in self._pending:
                return
            args, kwargs = self._pending.pop(i)
            self._last = (i, ((first_output(output), *args[1:]), kwargs))
            self.done += 1
            if self.done == len(self.blocks):
                raise StopForward
        return hook

    def starts(self, capture: str = "chain") -> list[bool]:
        """For each block, whether its inputs must be captured by re-running the model (all
        of them under ``capture="rerun"``). A ValueError names a block the forward never
        called, or one listed before a block the forward calls earlier, and says to pass
        ``blocks=`` in the forward's order."""
        called = set(self.order)
        missing = [name for i, (name, _) in enumerate(self.blocks) if i not in called]
        if missing:
            raise ValueError(f"block {missing[0]!r} is never called by the model's forward on the first calibration "
                             "batch, so it cannot be calibrated; pass blocks= with modules the forward calls, in the "
                             "order it calls them (or leave blocks= out to detect them)")
        for pos, i in enumerate(self.order):
            if pos != i:
                names = [self.blocks[j][0] for j in self.order]
                raise ValueError(f"the blocks to calibrate list {self.blocks[pos][0]!r} before {self.blocks[i][0]!r}, "
                                 f"but the model's forward calls {self.blocks[i][0]!r} first; pass blocks= in the "
                                 f"order the forward calls them: {_preview(names)}")
        return [capture == "rerun" or i == 0 or not self.linked[i] for i in range(len(self.blocks))]


def same(a: Any, b: Any) -> bool:
    """Whether two block calls (nested tuples, lists and dicts of tensors and plain values) are
    the same: tensors by identity, else shape, dtype and values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a truth value
        return False


def _without_cache(kwargs: dict) -> dict:
    """The keyword arguments as capture sees them: a key/value cache is never passed on."""
    return {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}


def _preview(names: list[str]) -> str:
    return "[" + ", ".join(map(repr, names[:6])) + (", ...]" if len(names) > 6 else "]")
