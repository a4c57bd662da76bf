import torch

from prunekit.oneshot.solvers.selection import magnitude_scores, select_mask, wanda_scores
from prunekit.sparsity.patterns import NM


def test_wanda_keeps_highest_weight_times_input_norm_per_row():
    torch.manual_seed(0)
    w = torch.randn(5, 8)
    x = torch.randn(100, 8) * torch.linspace(0.1, 3, 8)
    scores = wanda_scores(w, (x * x).sum(0))
    keep = select_mask(scores, 0.5, None, per_row=True)
    expected = (w.abs() * x.norm(dim=0)).topk(4, dim=1).indices
    for r in range(5):
        assert set(torch.nonzero(keep[r]).flatten().tolist()) == set(expected[r].tolist())


def test_magnitude_per_tensor_and_nm():
    w = torch.tensor([[0.1, -5.0, 0.2, 3.0], [4.0, 0.3, -0.4, 0.05]])
    keep = select_mask(magnitude_scores(w), 0.5, None, per_row=False)
    assert int(keep.sum()) == 4 and keep[0, 1] and keep[1, 0] and keep[0, 3]
    nm = select_mask(magnitude_scores(w), 0.5, NM(2, 4), per_row=False)
    assert nm.sum(1).tolist() == [2, 2]
