"""The tensor vocabulary: the ``[d_out, d_in]`` layout, patterns (unstructured, N:M), masks,
budgets across layers and sharded views. Knows nothing about modules or models."""
