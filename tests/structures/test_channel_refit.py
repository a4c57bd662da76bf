"""refine='snows' for channels: with K = 0 the lookahead loss is the consumer's own output error,
so Newton-CG must land on the least-squares solution of the kept im2col columns (a dense solve);
the conv's channel-major columns must reach the layer kind's position-major matrix correctly."""
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.structures.channel_refit import kind_columns
from prunekit.sparsity.layout import to_matrix
from tests.helpers.cnn_toys import conv_pair

SOLVE = {"k": 0, "epochs": 4, "max_cg": 300, "cg_tol": 1e-12, "damping": 0.0}


def _problem(bias: bool, batches: int = 3):
    """With one batch, Newton's steps and line search see the same rows as the oracle's solve."""
    model = conv_pair(bias=bias)
    torch.manual_seed(5)
    calib = [torch.randn(12 // batches, 3, 8, 8) for _ in range(batches)]
    with torch.no_grad():
        inputs = torch.cat([model[:3](x) for x in calib])
    cols = F.unfold(inputs.double(), 3, padding=1).transpose(1, 2).reshape(-1, 72)
    keep = torch.argsort(model[1].weight.detach(), stable=True)[4:].sort().values  # score="bn" keeps these
    return model, calib, cols, keep


def test_kind_columns_map_channel_major_to_the_kind_matrix():
    conv = nn.Conv2d(4, 2, 3)
    channel_major = conv.weight.detach().reshape(2, -1)
    torch.testing.assert_close(to_matrix(conv.weight.detach())[:, kind_columns(conv)], channel_major)


def test_snows_with_k0_from_dropped_columns_reaches_the_least_squares_solution():
    model, calib, cols, keep = _problem(bias=False, batches=1)
    dense_w = model[3].weight.detach().double().reshape(6, -1)
    pk.prune_channels(model, calib, ratio=0.5, score="bn", refine="snows", damp=0.0, recalibrate_bn=False,
                      refine_options={**SOLVE, "warm_start": "none"})
    kept = cols.view(-1, 8, 9)[:, keep].reshape(-1, 36)
    sol = torch.linalg.lstsq(kept, cols @ dense_w.T).solution.T
    got = model[3].weight.detach().double().reshape(6, -1)
    dropped = dense_w.view(6, 8, 9)[:, keep].reshape(6, 36)
    assert (got - sol).norm() < 1e-3 * (dropped - sol).norm()


def test_snows_with_k0_keeps_the_joint_least_squares_fit_with_its_bias():
    """D must be the dense layer (dense bias): with the fitted bias in D too, the optimum would move."""
    model, calib, cols, keep = _problem(bias=True)
    dense_w, dense_b = model[3].weight.detach().double().reshape(6, -1), model[3].bias.detach().double()
    pk.prune_channels(model, calib, ratio=0.5, score="bn", refine="snows", damp=0.0, recalibrate_bn=False,
                      refine_options=SOLVE)
    kept = cols.view(-1, 8, 9)[:, keep].reshape(-1, 36)
    design = torch.cat([kept, torch.ones(len(kept), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, cols @ dense_w.T + dense_b).solution
    torch.testing.assert_close(model[3].weight.detach().double().reshape(6, -1), sol[:36].T, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(model[3].bias.detach().double(), sol[36], rtol=2e-3, atol=2e-3)


def test_snows_options_without_snows_raise_and_leave_the_model():
    model = conv_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        pk.prune_channels(model, [torch.randn(2, 3, 8, 8)], ratio=0.5, refine="lstsq", refine_options={"k": 2})
    except ValueError as e:
        assert "refine='snows'" in str(e)
    else:
        raise AssertionError("no error")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
