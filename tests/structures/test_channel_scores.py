"""Channel scores: OBS against brute-force least-squares refits on a channel read by two
consumers, and the OBS-updated consumer against a dense solve."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.structures.channel_scores import columns, lowest

DAMP = 0.01  # the OBS damping prune_channels uses (as prune_structured)


class TwoReaders(nn.Module):
    """One group (``a``'s 6 channels) read by a 3x3 and a 1x1 conv whose sum is the output; the two
    weigh the channels differently, so that greedy OBS on ``b`` alone removes {2, 3, 4}, on ``c``
    alone {0, 1, 4}, and on their sum {0, 2, 4}."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 3, 3, padding=1, bias=False)
        self.c = nn.Conv2d(6, 3, 1, bias=False)
        with torch.no_grad():
            self.a.bias.fill_(0.5)
            self.b.weight.mul_(torch.tensor([1, 2, 0.2, 0.3, 0.6, 1.0]).view(1, 6, 1, 1))
            self.c.weight.mul_(torch.tensor([0.3, 0.2, 2, 1.0, 0.6, 1.5]).view(1, 6, 1, 1))

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


def _damped_h(model, name, calib):
    m = getattr(model, name)
    with torch.no_grad():
        cols = torch.cat([columns(m, torch.relu(model.a(x))).double() for x in calib])
    h = cols.T @ cols / len(cols)
    return h + DAMP * h.diagonal().mean() * torch.eye(len(h), dtype=torch.float64)


def _refit_error(w, h, drop_cols):
    """min over the kept columns of tr((W' - W) H (W' - W)^T): the Schur complement, by a dense solve."""
    keep = [j for j in range(h.shape[0]) if j not in set(drop_cols)]
    schur = h - h[:, keep] @ torch.linalg.solve(h[keep][:, keep], h[keep])
    return float((w @ schur * w).sum())


def test_obs_removes_what_brute_force_least_squares_removes_greedily():
    torch.manual_seed(0)
    calib = [torch.randn(4, 2, 6, 6) for _ in range(2)]
    model = TwoReaders().eval()
    hs = {n: _damped_h(model, n, calib) for n in ("b", "c")}
    ws = {n: getattr(model, n).weight.detach().double().reshape(3, -1) for n in ("b", "c")}
    spans = {"b": 9, "c": 1}
    chosen: list[int] = []
    for _ in range(3):  # greedy by brute force: the channel whose removal (with refits) costs least
        costs = {c: sum(_refit_error(ws[n], hs[n], [k * spans[n] + j for k in chosen + [c] for j in range(spans[n])])
                        for n in ("b", "c")) for c in range(6) if c not in chosen}
        chosen.append(min(costs, key=lambda c: (costs[c], c)))
    w_b = ws["b"].clone()
    result = pk.prune_channels(model, calib, ratio=0.5, score="obs", refine=None, recalibrate_bn=False)
    assert result.reports[0].removed == sorted(chosen) == [0, 2, 4]
    # refine=None keeps the OBS-updated consumer: the optimal refit of its kept columns (dense solve)
    keep = [j for j in range(54) if j // 9 not in chosen]
    h = hs["b"]
    expected = w_b @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])
    torch.testing.assert_close(model.b.weight.detach().double().reshape(3, -1), expected, rtol=1e-4, atol=1e-5)


def test_lowest_breaks_ties_towards_the_lower_channel():
    assert lowest(torch.tensor([2.0, 1.0, 1.0, 0.5]), 2) == [1, 3]


def test_wanda_columns_of_a_linear_on_tokens_are_rows_per_token():
    x = torch.randn(2, 5, 4)
    assert torch.equal(columns(nn.Linear(4, 3), x), x.reshape(10, 4))
    conv = nn.Conv2d(2, 3, 3, padding=1)
    img = torch.randn(1, 2, 4, 4)
    assert torch.equal(columns(conv, img), F.unfold(img, 3, padding=1).transpose(1, 2).reshape(-1, 18))


def test_obs_refuses_a_consumer_whose_hessian_would_not_fit_and_leaves_the_model():
    model = nn.Sequential(nn.Conv2d(1, 512, 1), nn.ReLU(), nn.Flatten(), nn.Linear(512 * 36, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^3: score='obs' would hold a 18432 x 18432 float64 Hessian \(2.5 GiB\)"):
        pk.prune_channels(model, [torch.randn(1, 1, 6, 6)], ratio=0.5, score="obs")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
