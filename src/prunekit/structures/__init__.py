"""Structured pruning: whole MLP neurons, attention heads and experts removed, the rest repaired, the
modules made physically smaller (see shared/specs/structured.md)."""
from .depth import DepthResult, block_importance, prune_blocks
from .experts import ExpertSite, find_experts
from .find import find_structures
from .prune import StructuredResult, prune_structured
from .expert_pruning import ExpertsResult, prune_experts, score_experts
from .units import Structure, StructureReport

__all__ = ["DepthResult", "ExpertSite", "ExpertsResult", "find_experts", "prune_experts", "score_experts", "Structure", "block_importance", "prune_blocks", "StructureReport", "StructuredResult", "find_structures", "prune_structured"]
