"""Structured pruning: whole MLP neurons and attention heads removed, the rest repaired, the
modules made physically smaller (see shared/specs/structured.md)."""
from .channels import ChannelResult, prune_channels
from .channels_graph import find_channel_groups
from .depth import DepthResult, block_importance, prune_blocks
from .find import find_structures
from .prune import StructuredResult, prune_structured
from .units import Structure, StructureReport

__all__ = ["ChannelResult", "DepthResult", "find_channel_groups", "prune_channels", "Structure", "block_importance", "prune_blocks", "StructureReport", "StructuredResult", "find_structures", "prune_structured"]
