"""prunekit: make PyTorch networks sparse and keep them accurate."""
from .allocation import allocate, erk, global_counts
from .layout import from_matrix, input_columns, to_matrix
from .masks import MaskSet
from .patterns import NM, Unstructured, check_nm, nm_mask, parse_pattern, topk_keep, unstructured_mask
from .targets import find_targets

__version__ = "0.1.0"
