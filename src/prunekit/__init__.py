"""prunekit: make PyTorch networks sparse and keep them accurate.

One shot, post-training::

    result = prunekit.prune(model, calibration, sparsity=0.9, method="magnitude", refine="snows")
    print(result.summary())

During training, inside your own loop::

    pruner = prunekit.SoftThreshold(model, optimizer, total_steps=n, target_sparsity=0.95)
    for batch in loader:
        loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad(); pruner.step()
    pruner.finalize()
"""
from . import llm
from .accelerate import AccelerateReport, SparseLinear, accelerate
from .sparsity.allocation import allocate, erk, global_counts
from .oneshot.batchnorm import recalibrate_batchnorm
from .eval import perplexity
from .formats.compact import CheckpointError, load, load_masks, save
from .formats.pretrained import load_pretrained_compressed, save_pretrained_compressed
from .jobs import RecipeOutcome, load_output, run_recipe
from .sparsity.layout import from_matrix, to_matrix
from .layers.base import input_columns
from .sparsity.masks import MaskSet
from .oneshot.solvers.newton_cg import NewtonCGConfig
from .oneshot.config import PruneConfig
from .oneshot.prune import METHODS, REFINES, prune
from .oneshot.result import LayerReport, PruneResult
from .plots import plot_layer_sparsity, plot_metric_vs_sparsity, plot_schedule
from .jobs import Recipe, list_recipes, load_recipe
from .report import ModelReport, model_report
from .speed import SpeedReport, speed_report
from .sparsity.patterns import NM, Unstructured, check_nm, nm_mask, parse_pattern, topk_keep, unstructured_mask
from .training.schedules import Constant, Cubic, Cyclical, OneShot, ThresholdSchedule
from .layers.targets import find_head, find_targets
from .structures import (StructuredConfig, apply_structure_shapes, block_importance, find_channel_groups,
                         find_structures, prune_blocks, prune_channels, prune_structured, structure_shapes)
from .structures import find_experts, prune_experts, score_experts
from .structures import (ChannelLatency, ChannelSensitivity, measure_channel_latency, measure_channel_sensitivity,
                         prune_channels_to_speedup)
from .formats.structured import load_structured
from .formats.channels import load_channels, save_channels
from .training import STR, GroupMagnitudePruner, GroupResult, GroupSoftThreshold, MagnitudePruner, SoftThreshold

from ._version import __version__
