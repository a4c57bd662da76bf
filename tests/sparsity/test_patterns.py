import itertools

import pytest
import torch

from prunekit.sparsity.patterns import NM, Unstructured, check_nm, nm_mask, parse_pattern, topk_keep, unstructured_mask


def test_parse():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern("unstructured") == Unstructured()
    for bad in ["4:2", "0:4", "2-4", "dense"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_exact_counts_with_ties(s):
    scores = torch.zeros(37, 11)  # all tied
    scores[::3] = 1.0
    keep = unstructured_mask(scores, s)
    assert int((~keep).sum()) == round(s * scores.numel())
    rows = unstructured_mask(scores, s, per_row=True)
    assert int((~rows).sum()) == round(s * scores.numel())  # the layer's count, exactly
    per_row = (~rows).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.min()) == round(s * scores.numel()) // 37


def test_per_row_remainder_is_spread_evenly():
    """147 columns at 50% (73.5 per row): 8 rows prune 73, 74, 73, 74, ... = 588 exactly."""
    rows = unstructured_mask(torch.rand(8, 147, generator=torch.Generator().manual_seed(0)), 0.5, per_row=True)
    assert (~rows).sum(1).tolist() == [73, 74] * 4
    assert int((~rows).sum()) == 588


def test_ties_broken_by_index_deterministically():
    keep = topk_keep(torch.tensor([1.0, 1.0, 1.0, 0.5]), 2)
    assert keep.tolist() == [True, True, False, False]


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 5)])
def test_nm_valid_for_every_group(n, m):
    torch.manual_seed(0)
    for shape in [(6, 4 * m), (5, 2 * m, 3, 3)]:
        w = torch.randn(shape)
        keep = nm_mask(w.abs(), NM(n, m))
        assert check_nm(keep, NM(n, m))
        assert int(keep.sum()) == w.numel() * n // m


def test_nm_on_a_weight_without_rows():
    keep = nm_mask(torch.zeros(0, 8), NM(2, 4))
    assert keep.shape == (0, 8) and check_nm(keep, NM(2, 4))


def test_nm_conv_groups_are_input_channels_at_one_kernel_position():
    w = torch.rand(1, 4, 3, 3)
    keep = nm_mask(w, NM(2, 4))
    assert (keep.sum(1) == 2).all()  # per kernel position, 2 of the 4 channels


def test_nm_keeps_best_by_brute_force():
    torch.manual_seed(1)
    w = torch.randn(3, 8)
    keep = nm_mask(w.abs(), NM(2, 4))
    for r, g in itertools.product(range(3), range(2)):
        block = w[r, 4 * g : 4 * g + 4].abs()
        assert set(torch.nonzero(keep[r, 4 * g : 4 * g + 4]).flatten().tolist()) == set(block.topk(2).indices.tolist())


def test_nm_rejects_misfit():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(3, 6), NM(2, 4))
