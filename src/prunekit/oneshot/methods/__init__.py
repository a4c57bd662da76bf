"""The one-shot methods that ship with prunekit, one file each, registered on import."""
from . import magnitude, wanda, sparsegpt, lstsq, snows  # noqa: F401  (registration order = listing order)
