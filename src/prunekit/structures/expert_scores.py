"""How much each expert of a mixture-of-experts layer is used, from calibration tokens.

Read where the layer hands its routing to its experts (``experts(hidden, top_k_index,
top_k_weights)``, the interface of transformers' fused experts), per token ``t`` and expert ``e``
chosen for it with weight ``g_e(t)``:

- ``frequency``: ``#{t: e in top-k(t)} / T``, how often the expert is chosen (the ``top_k``
  frequencies of a layer sum to ``top_k``);
- ``weight``: ``sum_t g_e(t) / T``, the mean router weight it receives (0 where not chosen);
- ``reap``: ``sum_t g_e(t) ||f_e(x_t)|| / T``, the mean norm of what it adds to the layer's
  output (REAP's router-weighted expert activation, averaged over all tokens rather than over
  the expert's own tokens, so a rarely chosen expert scores low): the output error of removing
  it, up to the renormalisation of the other experts' weights.

Lower scores go first; the expert outputs ``f_e`` are computed by the experts module itself, one
row per (token, chosen expert) pair, so the cost is one more pass of the experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SCORES = ("reap", "weight", "frequency")


@dataclass
class ExpertScores:
    """Sums over the calibration tokens (``tokens`` of them) of one layer's ``num_experts`` experts."""

    num_experts: int
    tokens: int = 0
    chosen: torch.Tensor = field(default=None)  # type: ignore[assignment]
    weight_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    reap_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("chosen", "weight_sum", "reap_sum"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_experts, dtype=torch.float64))

    def score(self, method: str) -> torch.Tensor:
        """Per-expert score of ``method`` (one of :data:`SCORES`), a mean over calibration tokens."""
        if method not in SCORES:
            raise ValueError(f"method must be one of {', '.join(SCORES)} for experts, got {method!r}")
        total = {"frequency": self.chosen, "weight": self.weight_sum, "reap": self.reap_sum}[method]
        return total / max(self.tokens, 1)

    def add(self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Count one call of ``experts``: ``hidden`` ``[T, H]``, ``index``/``weights`` ``[T, k]``."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        k = index.shape[-1]
        flat = index.reshape(-1).long()
        w = weights.reshape(-1).double()
        valid = (flat >= 0) & (flat < self.num_experts)  # expert-parallel sentinels are skipped
        pairs = hidden.repeat_interleave(k, dim=0)[valid]
        ids, w = flat[valid], w[valid]
        out = experts(pairs, ids[:, None], torch.ones(len(ids), 1, dtype=weights.dtype, device=weights.device))
        norms = out.double().norm(dim=-1)
        self.tokens += hidden.shape[0]
        ids = ids.cpu()
        self.chosen += torch.bincount(ids, minlength=self.num_experts).double()
        self.weight_sum.index_add_(0, ids, w.cpu())
        self.reap_sum.index_add_(0, ids, (w * norms).cpu())


class ExpertRecorder:
    """Adds every call of an experts module to an :class:`ExpertScores` (a forward pre-hook; the
    module's own calls made while scoring are not counted)."""

    ARGS = ("hidden_states", "top_k_index", "top_k_weights")

    def __init__(self, experts: nn.Module, scores: ExpertScores) -> None:
        self.experts, self.scores, self._busy = experts, scores, False
        self._handle = experts.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs) -> None:
        if self._busy:
            return
        values = list(args) + [kwargs[a] for a in self.ARGS[len(args):] if a in kwargs]
        if len(values) < 3:
            raise TypeError(f"experts module {type(self.experts).__name__} was not called as "
                            "experts(hidden_states, top_k_index, top_k_weights); its routing cannot be read")
        self._busy = True
        try:
            with torch.no_grad():
                self.scores.add(self.experts, *values[:3])
        finally:
            self._busy = False

    def close(self) -> None:
        self._handle.remove()
