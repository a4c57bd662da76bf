"""One-shot post-training pruning: choose a support, then optionally refit the survivors."""
