"""Pruners used inside the user's own training loop: call ``pruner.step()`` after ``optimizer.step()``."""
from .base import PrunerBase
from .magnitude import MagnitudePruner
from .soft_threshold import SoftThreshold
from .str_pruner import STR

__all__ = ["PrunerBase", "MagnitudePruner", "SoftThreshold", "STR"]
