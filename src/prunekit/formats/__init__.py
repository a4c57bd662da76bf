"""Writing and reading pruned models: prunekit's compact checkpoint format and atomic writes."""
