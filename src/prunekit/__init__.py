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
from .allocation import allocate, erk, global_counts
from .batchnorm import recalibrate_batchnorm
from .eval import perplexity
from .export import CheckpointError, load, load_masks, load_pretrained_compressed, save, save_pretrained_compressed
from .jobs import RecipeOutcome, load_output, run_recipe
from .layout import from_matrix, input_columns, to_matrix
from .masks import MaskSet
from .oneshot.newton_cg import NewtonCGConfig
from .oneshot.prune import METHODS, REFINES, prune
from .oneshot.result import LayerReport, PruneResult
from .oneshot.snows import SnowsConfig
from .plots import plot_layer_sparsity, plot_metric_vs_sparsity, plot_schedule
from .recipe import Recipe, list_recipes, load_recipe
from .report import ModelReport, model_report
from .patterns import NM, Unstructured, check_nm, nm_mask, parse_pattern, topk_keep, unstructured_mask
from .schedules import Constant, Cubic, Cyclical, OneShot, ThresholdSchedule
from .targets import find_targets
from .training import STR, MagnitudePruner, SoftThreshold

__version__ = "0.1.0"
