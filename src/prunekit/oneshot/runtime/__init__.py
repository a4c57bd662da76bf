"""Where and how the one-shot work runs: the execution device and dtype (placement), models
dispatched with accelerate (offload), processes calibrating together (ranks), and the on-disk
restore point that puts a model back exactly on failure."""
