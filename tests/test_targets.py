import pytest
import torch
from torch import nn

from prunekit.targets import find_targets


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.emb.weight  # tied


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)


def test_defaults_exclude_embeddings_norms_and_tied_head():
    assert list(find_targets(Tiny())) == ["conv", "body"]


def test_final_classifier_excluded_unless_asked():
    assert list(find_targets(Classifier())) == ["a", "b"]
    assert list(find_targets(Classifier(), include_head=True)) == ["a", "b", "fc"]


def test_include_exclude_types():
    m = Classifier()
    assert list(find_targets(m, include=r"^(a|fc)$")) == ["a", "fc"]
    assert list(find_targets(m, exclude="b")) == ["a"]
    assert list(find_targets(m, types=(nn.Conv2d,))) == ["b"]


def test_bad_include_exclude_regex_is_a_value_error():
    with pytest.raises(ValueError, match="include must be regular expressions"):
        find_targets(Classifier(), include="(")
    with pytest.raises(ValueError, match="exclude must be regular expressions"):
        find_targets(Classifier(), exclude=["a", "[b"])


def test_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        find_targets(torch.zeros(3))


def test_last_layer_of_sequential_is_the_head():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(find_targets(mlp)) == ["0"]
