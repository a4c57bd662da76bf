"""Structured pruning: whole MLP neurons and attention heads removed, the rest repaired, the
modules made physically smaller (see shared/specs/structured.md)."""
from .find import find_structures
from .prune import StructuredResult, prune_structured
from .units import Structure, StructureReport

__all__ = ["Structure", "StructureReport", "StructuredResult", "find_structures", "prune_structured"]
