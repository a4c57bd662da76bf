"""Layer kinds: how each module type is seen as ``[d_out, d_in]`` matrices, and which layers of
a model are prunable (:mod:`.targets`). This package registers the kinds that ship with
prunekit; :func:`register_kind` adds one of your own."""
from .attention import MultiheadAttentionKind
from .base import LayerKind, input_columns, kind_of, kinds, prunable_types, register_kind, register_when_imported
from .base import unregister_kind
from .conv import ConvKind
from .experts import FusedExperts, FusedExpertsKind
from .hf import HFConv1DKind
from .linear import LinearKind

register_kind(LinearKind())
register_kind(ConvKind())
register_kind(MultiheadAttentionKind())
# fused 3-D experts (transformers 5's Mixtral, Qwen2-MoE, ...): matched by layout, needs no import
register_kind(FusedExpertsKind())
# transformers' Conv1D: added once transformers is imported (prunekit never imports it itself)
register_when_imported("hf-conv1d", "transformers.pytorch_utils", HFConv1DKind)

__all__ = ["ConvKind", "FusedExperts", "FusedExpertsKind", "HFConv1DKind", "LayerKind", "LinearKind",
           "MultiheadAttentionKind", "input_columns", "kind_of", "kinds", "prunable_types", "register_kind",
           "register_when_imported", "unregister_kind"]
