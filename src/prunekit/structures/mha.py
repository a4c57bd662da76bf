"""A drop-in for ``nn.MultiheadAttention`` that can hold fewer heads than ``embed_dim / head_dim``.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``head_dim = embed_dim //
num_heads``), so it cannot lose a head in place; and it calls ``out_proj`` functionally, so no hook
sees the attention output. :class:`PrunedMultiheadAttention` has the same call signature and the
same ``state_dict`` keys (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``), keeps ``head_dim`` fixed and lets ``num_heads`` shrink; it calls ``out_proj`` as
a module. :func:`swap_in` replaces a model's ``nn.MultiheadAttention`` modules by it (sharing their
parameters, no copy) before heads are removed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .surgery import Undo
from .units import Structure


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim`` free of ``embed_dim``: q, k, v are
    the three row blocks of ``in_proj_weight`` (``[3 * num_heads * head_dim, embed_dim]``),
    attention runs in :func:`torch.nn.functional.scaled_dot_product_attention` (explicitly when
    ``need_weights``), and ``out_proj`` maps ``num_heads * head_dim`` back to ``embed_dim``.

    Supported: batched or unbatched inputs, ``batch_first``, self- and cross-attention (key and
    value of width ``embed_dim``), ``key_padding_mask`` and ``attn_mask`` (bool or float; 2-D, or
    3-D with one mask per batch item and *kept* head), ``need_weights`` (averaged over heads or
    not), ``is_causal``, dropout. ``_qkv_same_embed_dim`` is False so that torch's fused
    ``TransformerEncoderLayer`` path, which assumes ``num_heads * head_dim == embed_dim``, is
    never taken."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self._qkv_same_embed_dim = False
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, name: str = "") -> "PrunedMultiheadAttention":
        """The same attention, sharing ``mha``'s parameters and ``out_proj`` module (no copy);
        ValueError naming ``name`` for a layout it does not reproduce."""
        why = why_not(mha)
        if why:
            raise ValueError(f"{name or type(mha).__name__}: nn.MultiheadAttention with {why} cannot lose heads; "
                             "exclude it (structures='mlp') or build it without that option")
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, batch_first=mha.batch_first, device="meta")
        new.in_proj_weight, new.in_proj_bias, new.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested:
            raise ValueError("PrunedMultiheadAttention: nested tensor inputs are not supported; pass padded "
                             "tensors with key_padding_mask")
        batched = query.dim() == 3
        self_attention = query is key and key is value  # one fused q/k/v product, as torch's own path does
        q, k, v = (x if not batched else x if self.batch_first else x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        b, tq, ts, h, d = q.shape[0], q.shape[1], k.shape[1], self.num_heads, self.head_dim
        if self_attention:
            q, k, v = F.linear(q, self.in_proj_weight, self.in_proj_bias).view(b, tq, 3, h, d).permute(2, 0, 3, 1, 4)
        else:
            w = self.in_proj_weight.chunk(3)
            bias = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = (F.linear(x, wi, bi).view(b, -1, h, d).transpose(1, 2) for x, wi, bi in zip((q, k, v), w, bias))
        mask = self._mask(attn_mask, key_padding_mask, b, tq, ts, q.dtype)
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            if causal:
                mask = torch.zeros(tq, ts, dtype=q.dtype, device=q.device).masked_fill(
                    torch.ones(tq, ts, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, p) if p else weights  # as torch does: the weights returned are dropped too
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 scale=d ** -0.5)
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, h * d))
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(self, attn_mask, key_padding_mask, b, tq, ts, dtype) -> torch.Tensor | None:
        """One additive float mask ``[b or 1, heads or 1, tq, ts]`` (True in a bool mask: not attended)."""
        merged = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            if m.dim() == 2:
                m = m.view(1, 1, tq, ts)
            elif m.dim() == 3 and m.shape[0] == b * self.num_heads:
                m = m.view(b, self.num_heads, tq, ts)
            else:
                raise ValueError(f"attn_mask must be [{tq}, {ts}] or [batch * num_heads = {b * self.num_heads}, "
                                 f"{tq}, {ts}] (num_heads is the number of heads kept), got {tuple(attn_mask.shape)}")
            merged = m
        if key_padding_mask is not None:
            m = _additive(key_padding_mask, dtype).view(b, 1, 1, ts)
            merged = m if merged is None else merged + m
        return merged


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def why_not(mha: nn.MultiheadAttention) -> str | None:
    """What :class:`PrunedMultiheadAttention` does not reproduce in ``mha`` (None: nothing)."""
    if not mha._qkv_same_embed_dim:
        return f"kdim/vdim ({mha.kdim}, {mha.vdim}) other than embed_dim {mha.embed_dim}"
    if mha.bias_k is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def swap_in_attentions(model: nn.Module, names: list[str], undo: Undo) -> bool:
    """:func:`swap_in` for attention modules named directly (a channel graph's heads groups)."""
    return swap_in(model, [Structure("heads", name, (), "", 0) for name in names], undo)


def swap_in(model: nn.Module, found: list[Structure], undo: Undo) -> bool:
    """Replace every ``nn.MultiheadAttention`` owning a heads structure by the drop-in (logged in
    ``undo``); True when anything was replaced."""
    swapped = False
    for s in found:
        if s.kind != "heads":
            continue
        module = model.get_submodule(s.owner)
        if not isinstance(module, nn.MultiheadAttention):
            continue
        if not s.owner:
            raise ValueError("a bare nn.MultiheadAttention cannot be replaced in place; wrap it in a module and "
                             "prune that")
        parent_name, _, child = s.owner.rpartition(".")
        undo.set(model.get_submodule(parent_name), child, PrunedMultiheadAttention.from_torch(module, s.owner))
        swapped = True
    return swapped
