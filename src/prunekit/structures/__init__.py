"""Structured pruning: whole MLP neurons and attention heads removed, the rest repaired, the
modules made physically smaller (see shared/specs/structured.md)."""
from .config import StructuredConfig
from .depth import DepthResult, block_importance, prune_blocks
from .find import find_structures
from .prune import StructuredResult, prune_structured
from .shapes import apply_structure_shapes, structure_shapes
from .units import Structure, StructureReport

__all__ = ["DepthResult", "Structure", "StructuredConfig", "apply_structure_shapes", "block_importance", "prune_blocks",
           "StructureReport", "StructuredResult", "find_structures", "prune_structured", "structure_shapes"]
