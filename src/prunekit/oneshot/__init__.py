"""One-shot post-training pruning: choose a support, then optionally refit the survivors.

``solvers/`` is pure tensor code (SparseGPT, least squares, Newton-CG, mask selection),
``runtime/`` places the work (devices, offload, ranks, the restore point), ``methods/`` are the
registered adapters, and ``prune`` runs them block by block. Importing this package registers
the methods that ship with prunekit.
"""
from . import methods  # noqa: F401  (registers the built-in methods)
