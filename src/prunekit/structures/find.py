"""Finding a model's structures from its module layout (no names of model classes needed).

Recognised MLPs (an elementwise activation between producers and consumer):
``gate_proj``/``up_proj`` -> ``down_proj`` (SwiGLU: Llama, Mistral, Qwen); ``intermediate.dense`` ->
``output.dense`` (BERT); ``c_fc`` -> ``c_proj`` (GPT-2, transformers' ``Conv1D``); ``fc1`` -> ``fc2``
(ViT, CLIP, OPT); ``linear1`` -> ``linear2`` (``nn.TransformerEncoderLayer``/``DecoderLayer``);
``nn.Sequential(Linear, activation, Linear)`` (a hand-written ViT).
Recognised attention (:data:`ATTENTION_LAYOUTS`): ``q_proj``/``k_proj``/``v_proj`` -> ``o_proj`` with a
``head_dim`` (Llama-style, grouped-query included); ``self.query``/``self.key``/``self.value`` ->
``output.dense`` (BERT's ``BertAttention``); ``c_attn`` (q, k, v fused) -> ``c_proj`` (GPT-2);
``nn.MultiheadAttention`` (``in_proj_weight`` -> ``out_proj``; pruned through the drop-in of
:mod:`.mha`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.base import kind_of
from .mha import why_not
from .units import KINDS, Structure

#: (producers, consumer, config field of the width) of every recognised MLP layout
MLP_LAYOUTS = (
    (("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    (("intermediate.dense",), "output.dense", "intermediate_size"),
    (("c_fc",), "c_proj", "n_inner"),
    (("fc1",), "fc2", None),
    (("linear1",), "linear2", None),
)


def _linear_like(module: nn.Module | None) -> bool:
    """A Linear or transformers' Conv1D: a single-matrix layer kind whose rows are outputs."""
    try:
        return module is not None and kind_of(module).name in ("linear", "hf-conv1d")
    except TypeError:
        return False


def _get(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path`` ("" is ``module`` itself), or None."""
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def out_features(module: nn.Module) -> int:
    """Output width of a Linear or transformers' Conv1D (rows of its layer kind's matrix)."""
    return kind_of(module).matrix(module).shape[0]


def _mlp(name: str, module: nn.Module) -> Structure | None:
    for producers, consumer, key in MLP_LAYOUTS:
        mods = [_get(module, p) for p in (*producers, consumer)]
        if all(_linear_like(m) for m in mods):
            widths = {out_features(m) for m in mods[:-1]}
            if len(widths) != 1:
                continue
            prefix = f"{name}." if name else ""
            if key and name.rsplit(".", 1)[-1] == "shared_expert":  # Qwen2-MoE: its own width field
                key = "shared_expert_intermediate_size"
            return Structure("mlp", name, tuple(prefix + p for p in producers), prefix + consumer, widths.pop(),
                             config_key=key)
    return None


#: modules that act element by element, allowed between an nn.Sequential MLP's two linears
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish,
               nn.Dropout, nn.Identity)


def _sequential_mlp(name: str, module: nn.Module) -> Structure | None:
    """``nn.Sequential(Linear, activation, [Dropout], Linear)``: the MLP of a hand-written ViT."""
    if not isinstance(module, nn.Sequential) or len(module) < 3:
        return None
    first, *middle, last = list(module)
    if not (_linear_like(first) and _linear_like(last) and all(isinstance(m, ELEMENTWISE) for m in middle)):
        return None
    names = [n for n, _ in module.named_children()]
    prefix = f"{name}." if name else ""
    return Structure("mlp", name, (prefix + names[0],), prefix + names[-1], out_features(first))


#: (q, k, v, out, head size attribute, config field of the head count) of every recognised
#: attention layout, paths relative to the attention module ("": the module itself). k and v None:
#: q's output rows stack the queries, keys and values (fused, one head's rows in each third). A
#: config field None: the config cannot express fewer heads (head size = hidden / heads).
ATTENTION_LAYOUTS = (
    ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_attention_heads"),  # Llama, Mistral, Qwen
    ("self.query", "self.key", "self.value", "output.dense", "self.attention_head_size", None),  # BERT
    ("c_attn", None, None, "c_proj", "head_dim", None),  # GPT-2 (transformers' Conv1D)
    ("", None, None, "out_proj", "head_dim", None),  # nn.MultiheadAttention (in_proj_weight)
)


def producer_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[d_out, d_in]`` matrix and bias of a producer: a Linear or Conv1D, or the stacked
    q/k/v ``in_proj_weight`` of ``nn.MultiheadAttention`` (and its drop-in)."""
    if isinstance(getattr(module, "in_proj_weight", None), torch.Tensor):
        return module.in_proj_weight.detach(), module.in_proj_bias
    return kind_of(module).matrix(module), module.bias


def _rows(module: nn.Module | None) -> int | None:
    """Output rows of a would-be producer (None: not a producer)."""
    if isinstance(module, nn.MultiheadAttention):  # in_proj_weight, or q/k/v_proj_weight (refused below)
        return 3 * module.embed_dim
    if isinstance(getattr(module, "in_proj_weight", None), torch.Tensor):  # the drop-in
        return module.in_proj_weight.shape[0]
    return out_features(module) if _linear_like(module) else None


def _join(name: str, path: str) -> str:
    return ".".join(p for p in (name, path) if p)


def _attention(name: str, module: nn.Module) -> Structure | None:
    for q_path, k_path, v_path, out_path, dim_path, key in ATTENTION_LAYOUTS:
        holder_path = dim_path.rpartition(".")[0]
        holder = _get(module, holder_path)
        head_dim = getattr(holder, dim_path.rpartition(".")[2], None) if holder is not None else None
        q, out = _get(module, q_path), _get(module, out_path)
        if not (isinstance(head_dim, int) and head_dim > 0 and _linear_like(out)) or _rows(q) is None:
            continue
        rows, d_out_in = _rows(q), kind_of(out).matrix(out).shape[1]
        at = _join(name, holder_path) if holder_path else None
        common = dict(unit_size=head_dim, config_key=key, attributes_at=at)
        if k_path is None:  # fused q, k, v
            if rows % (3 * head_dim) or d_out_in != rows // 3:
                continue
            if isinstance(module, nn.MultiheadAttention) and why_not(module):
                raise ValueError(f"{name or 'the model'}: nn.MultiheadAttention with {why_not(module)} cannot lose "
                                 "heads; prune structures='mlp' only, or build it without that option")
            return Structure("heads", name, (_join(name, q_path),), _join(name, out_path), rows // (3 * head_dim),
                             fused=3, **common)
        k, v = _get(module, k_path), _get(module, v_path)
        if not (_linear_like(k) and _linear_like(v)) or rows % head_dim or out_features(k) % head_dim \
                or out_features(k) != out_features(v) or d_out_in != rows:
            continue
        heads, kv = rows // head_dim, out_features(k) // head_dim
        if heads % kv:
            continue
        return Structure("heads", name, (_join(name, q_path),), _join(name, out_path), heads,
                         kv_producers=(_join(name, k_path), _join(name, v_path)), q_per_kv=heads // kv, **common)
    return None


def find_structures(model: nn.Module, kinds: tuple[str, ...] = ("mlp",)) -> list[Structure]:
    """Every recognised structure of the given kinds (``"mlp"``, ``"heads"``), in module order.
    A module inside a structure already found is not searched again."""
    unknown = [k for k in kinds if k not in KINDS or k == "blocks"]
    if unknown:
        raise ValueError(f"structures must be drawn from mlp, heads (blocks: see prune_blocks), got {unknown}")
    found: list[Structure] = []
    for name, module in model.named_modules():
        for kind, finder in (("mlp", _mlp), ("mlp", _sequential_mlp), ("heads", _attention)):
            if kind in kinds and not any(name.startswith(s.owner + ".") or name == s.owner for s in found
                                         if s.kind == kind and s.owner):
                hit = finder(name, module)
                if hit is not None:
                    found.append(hit)
    return found
