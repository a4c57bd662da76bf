"""Calibration statistics: sums over batches equal the products of all rows at once."""
import pytest
import torch
from torch import nn

from prunekit.oneshot.stats import gather_stats


class _QKV(nn.Module):
    """Three layers reading one input (their X^T X is computed once per batch and shared)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: sums in the activations' dtype
def test_layers_sharing_an_input_each_get_the_full_sums_over_batches(dtype):
    block = _QKV()
    batches = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = gather_stats(block, [((x,), {}) for x in batches], {"q": block.q, "k": block.k, "v": block.v}, dtype=dtype)
    rows = torch.cat(batches).double()  # the exact sums, in float64
    # Each batch's product runs in the activations' float32 (whatever dtype the sums are kept in):
    # float32 tolerances, since another BLAS rounds those products differently.
    tol = dict(rtol=1e-5, atol=1e-5)
    for name in "qkv":
        s = stats[name]
        assert s.count == 15 and s.h_sum.dtype == dtype
        torch.testing.assert_close(s.h_sum.double(), rows.T @ rows, **tol)
        torch.testing.assert_close(s.sq_sum.double(), (rows * rows).sum(0), **tol)
