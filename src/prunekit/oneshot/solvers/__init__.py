"""Pure tensor code for one layer's matrix: mask selection, SparseGPT, least squares, Newton-CG.
Nothing here knows about networks, blocks or devices."""
