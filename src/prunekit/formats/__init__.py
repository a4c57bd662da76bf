"""Writing and reading pruned models: prunekit's compact format (packing -> codecs -> compact ->
pretrained: one job each) and atomic writes."""
