"""Finding a model's structures from its module layout (no names of model classes needed).

Recognised MLPs (an elementwise activation between producers and consumer):
``gate_proj``/``up_proj`` -> ``down_proj`` (SwiGLU: Llama, Mistral, Qwen); ``intermediate.dense`` ->
``output.dense`` (BERT); ``c_fc`` -> ``c_proj`` (GPT-2, transformers' ``Conv1D``); ``fc1`` -> ``fc2``
(ViT, CLIP, OPT); ``linear1`` -> ``linear2`` (``nn.TransformerEncoderLayer``/``DecoderLayer``);
``nn.Sequential(Linear, activation, Linear)`` (a hand-written ViT).
Recognised attention: ``q_proj``/``k_proj``/``v_proj`` -> ``o_proj`` with a ``head_dim`` (Llama-style,
grouped-query included).
"""
from __future__ import annotations

from torch import nn

from ..layers.base import kind_of
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
    for part in path.split("."):
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


def _attention(name: str, module: nn.Module) -> Structure | None:
    projs = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    head_dim = getattr(module, "head_dim", None)
    if not all(isinstance(m, nn.Linear) for m in projs) or not isinstance(head_dim, int):
        return None
    q, k, v, o = projs
    if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
        return None
    heads, kv = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv or o.in_features != q.out_features:
        return None
    prefix = f"{name}." if name else ""
    return Structure("heads", name, (prefix + "q_proj",), prefix + "o_proj", heads, unit_size=head_dim,
                     kv_producers=(prefix + "k_proj", prefix + "v_proj"), q_per_kv=heads // kv)


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
