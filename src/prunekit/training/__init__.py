"""Pruners used inside the user's own training loop: call ``pruner.step()`` after ``optimizer.step()``."""
from .base import PrunerBase
from .group_base import GroupResult
from .group_magnitude import GroupMagnitudePruner
from .group_soft_threshold import GroupSoftThreshold
from .magnitude import MagnitudePruner
from .soft_threshold import SoftThreshold
from .str_pruner import STR

__all__ = ["PrunerBase", "MagnitudePruner", "SoftThreshold", "STR", "GroupSoftThreshold", "GroupMagnitudePruner",
           "GroupResult"]
