import pytest
import torch

from prunekit.oneshot.calibration import collect_batches


def test_collect_validates():
    assert len(collect_batches((torch.ones(1) for _ in range(5)), max_batches=2)) == 2
    with pytest.raises(ValueError, match="empty"):
        collect_batches([])
    with pytest.raises(ValueError, match="required"):
        collect_batches(None)
    with pytest.raises(TypeError, match="wrap a single batch"):
        collect_batches(torch.ones(3))
    with pytest.raises(TypeError, match="tensors, tuples or mappings"):
        collect_batches([3])
    with pytest.raises(ValueError, match="NaN"):
        collect_batches([torch.tensor([float("inf")])])


def test_batches_without_samples_are_refused():
    # found by the prune() property test: a zero-row batch calibrated every method on nothing
    with pytest.raises(ValueError, match="no samples"):
        collect_batches([torch.zeros(0, 4), (torch.zeros(0, 4),)])
    assert len(collect_batches([torch.zeros(0, 4), torch.ones(1, 4)])) == 2  # one empty batch among others is fine
