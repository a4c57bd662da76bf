"""Recipe jobs: a recipe file (one :class:`prunekit.oneshot.config.PruneConfig` plus model, data
and output), loading what it points at, running it (under torchrun too) and writing its outputs."""
from .recipe import Recipe, list_recipes, load_recipe
from .runner import RecipeOutcome, load_output, run_recipe

__all__ = ["Recipe", "RecipeOutcome", "list_recipes", "load_output", "load_recipe", "run_recipe"]
