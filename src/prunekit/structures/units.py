"""What a structure is: a set of weights that leave together so modules can be made smaller.

Every structure reduces to one *consumer* layer whose input columns are deleted in groups (an MLP
neuron is one column of ``down_proj``; an attention head is ``head_dim`` columns of ``o_proj``)
and the *producer* layers whose output rows feed those columns (``gate_proj``/``up_proj`` rows;
a head's q, k and v rows). See shared/specs/structured.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("mlp", "heads", "blocks")


@dataclass
class Structure:
    """One prunable structure site in a model.

    ``kind`` is ``"mlp"`` (neurons) or ``"heads"`` (attention heads); ``owner`` the module that
    holds it (``model.layers.3.mlp``); ``producers`` the modules whose output rows go, ``consumer``
    the module whose input columns go. ``units`` neurons or query heads, ``unit_size`` columns per
    unit (1 or ``head_dim``). For heads, ``kv_producers`` are the key and value projections and
    ``q_per_kv`` the query heads sharing one key/value head (grouped-query attention).
    ``fused``: the producers' output rows are that many equal parts (GPT-2's ``c_attn`` and
    ``nn.MultiheadAttention``'s ``in_proj_weight`` stack q, k, v: 3) and a unit's rows go from
    each part. ``attributes_at``: the module holding the head count attributes (``num_heads``,
    ``all_head_size``, ...; None: ``owner``). ``config_key`` None for heads: the config cannot
    express fewer heads (BERT, GPT-2: head size = hidden / heads) and is left alone."""

    kind: str
    owner: str
    producers: tuple[str, ...]
    consumer: str
    units: int
    unit_size: int = 1
    kv_producers: tuple[str, ...] = ()
    q_per_kv: int = 1
    config_key: str | None = None  # the config field holding the width ("intermediate_size", "n_inner")
    fused: int = 1
    attributes_at: str | None = None

    @property
    def kv_heads(self) -> int:
        return self.units // self.q_per_kv

    def column_groups(self) -> torch.Tensor:
        """``[units, unit_size]``: the consumer's input columns of each unit."""
        return torch.arange(self.units * self.unit_size).view(self.units, self.unit_size)

    def removable(self, count: int) -> str | None:
        """Why ``count`` units cannot be removed (None: they can)."""
        if count >= self.units:
            return f"removing {count} of {self.units} {self._noun()} leaves none"
        if self.kind == "heads" and self.q_per_kv > 1 and count % self.kv_heads:
            return (f"grouped-query attention with {self.kv_heads} key/value heads needs the same number of query "
                    f"heads removed from every group: a multiple of {self.kv_heads}, got {count}")
        return None

    def _noun(self) -> str:
        return "neurons" if self.kind == "mlp" else "heads"


@dataclass
class StructureReport:
    """What happened to one structure: units before/after, the consumer's output error (mean
    squared, summed over outputs) of dropping the units without and with the refit, seconds, and
    for ``refine="snows"`` the lookahead loss on the held-out batch (warm start, after)."""

    kind: str
    owner: str
    units_before: int
    units_after: int
    error_dropped: float | None = None
    error_refit: float | None = None
    seconds: float = 0.0
    removed: list[int] = field(default_factory=list)
    lookahead: tuple[float, float] | None = None
