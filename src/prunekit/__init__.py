"""prunekit: make PyTorch networks sparse and keep them accurate.

One shot, post-training::

    result = prunekit.prune(model, calibration, sparsity=0.9, method="magnitude", refine="snows")
    print(result.summary())
"""
from .allocation import allocate, erk, global_counts
from .layout import from_matrix, input_columns, to_matrix
from .masks import MaskSet
from .oneshot.newton_cg import NewtonCGConfig
from .oneshot.prune import METHODS, REFINES, prune
from .oneshot.result import LayerReport, PruneResult
from .oneshot.snows import SnowsConfig
from .patterns import NM, Unstructured, check_nm, nm_mask, parse_pattern, topk_keep, unstructured_mask
from .targets import find_targets

__version__ = "0.1.0"
