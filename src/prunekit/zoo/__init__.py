"""Small reference models and offline data loaders for the demo, tests and benchmarks."""
