"""Structured pruning: whole MLP neurons and attention heads removed, the rest repaired, the
modules made physically smaller (see shared/specs/structured.md)."""
from .config import StructuredConfig
from .depth import DepthResult, block_importance, prune_blocks
from .find import find_structures
from .prune import StructuredResult, prune_structured
from .units import Structure, StructureReport

__all__ = ["DepthResult", "Structure", "block_importance", "prune_blocks", "StructureReport", "StructuredConfig", "StructuredResult", "find_structures", "prune_structured"]
