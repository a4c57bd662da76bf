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


# -- input_key: labelled loaders -----------------------------------------------------------
import copy  # noqa: E402

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.oneshot.calibration import pick_input  # noqa: E402


class _CNN(nn.Module):
    """A forward of one argument, as torchvision's ResNet has: (x, y) batches are one too many."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 6, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4), x


def test_a_labelled_loader_is_refused_naming_input_key_and_the_model_is_unchanged():
    model, (loader, _) = _CNN(), _loader()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"positional argument.*input_key=0"):
        pk.prune(model, loader, sparsity=0.5, method="wanda", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


@pytest.mark.parametrize("input_key", [0, -2, lambda batch: batch[0]])
def test_input_key_gives_the_model_the_inputs_of_a_labelled_loader(input_key):
    """The oracle: the same call on a list of the input batches alone."""
    (loader, x), model, expected = _loader(), _CNN(), _CNN()
    result = pk.prune(model, loader, sparsity=0.5, method="sparsegpt", input_key=input_key, progress=False)
    pk.prune(expected, list(x.split(4)), sparsity=0.5, method="sparsegpt", progress=False)
    assert [r.name for r in result.layers] == ["conv1", "conv2"] and result.sparsity == 0.5  # fc: the head
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_input_key_picks_an_entry_of_mapping_batches():
    _, x = _loader()
    calls = collect_batches([{"pixels": b, "label": 0} for b in x.split(4)], input_key="pixels")
    assert len(calls) == 3 and all(kw == {} and torch.equal(a[0], b) for (a, kw), b in zip(calls, x.split(4)))


def test_bad_input_keys_are_refused_naming_it():
    x = torch.ones(2, 3)
    with pytest.raises(TypeError, match="input_key=0 picks an element of tuple batches.*Tensor"):
        pick_input(x, 0)
    with pytest.raises(ValueError, match="input_key=2 is out of range.*tuple of 2"):
        pick_input((x, x), 2, 0)
    with pytest.raises(ValueError, match=r"input_key='x' is no key.*its keys: pixels"):
        pick_input({"pixels": x}, "x")
    model = _CNN()
    before = copy.deepcopy(model.state_dict())
    for bad in (True, 1.5, ["x"]):
        with pytest.raises(TypeError, match="input_key must be an index"):
            pk.prune(model, [x], sparsity=0.5, method="wanda", input_key=bad)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def test_input_key_in_a_recipe():
    """(The command line's --input-key: tests/cli/test_cli.py.)"""
    from prunekit.jobs.recipe import load_recipe

    recipe = load_recipe({"model": "m", "data": {"tensors": "x.pt"}, "prune": {"sparsity": 0.5, "input_key": 0}})
    assert recipe.prune.input_key == 0 and recipe.to_dict()["prune"]["input_key"] == 0
    with pytest.raises(ValueError, match="prune.input_key must be an integer or a string"):
        load_recipe({"model": "m", "prune": {"sparsity": 0.5, "input_key": [0]}})
