"""Structured pruning: whole MLP neurons, attention heads and experts removed, the rest repaired, the
modules made physically smaller (see shared/specs/structured.md)."""
from .channel_latency import ChannelLatency, measure_channel_latency
from .channel_sensitivity import ChannelSensitivity, measure_channel_sensitivity
from .channel_speed import prune_channels_to_speedup
from .channels import ChannelResult, prune_channels
from .channels_graph import find_channel_groups
from .config import StructuredConfig
from .depth import DepthResult, block_importance, prune_blocks
from .experts import ExpertSite, find_experts
from .find import find_structures
from .prune import StructuredResult, prune_structured
from .expert_pruning import ExpertsResult, prune_experts, score_experts
from .shapes import apply_structure_shapes, structure_shapes
from .units import Structure, StructureReport

__all__ = ["ChannelLatency", "ChannelResult", "ChannelSensitivity", "DepthResult", "ExpertSite", "ExpertsResult", "Structure", "StructuredConfig",
           "apply_structure_shapes", "block_importance", "find_channel_groups", "find_experts", "find_structures",
           "measure_channel_latency", "measure_channel_sensitivity", "prune_blocks", "prune_channels", "prune_channels_to_speedup", "prune_experts", "prune_structured", "score_experts", "StructureReport",
           "StructuredResult", "structure_shapes"]
