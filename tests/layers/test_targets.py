import pytest
import torch
from torch import nn

from prunekit.layers.targets import find_targets


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


# -- the head, found by structure ------------------------------------------------------------
import warnings  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.layers.targets import HEAD_REASON  # noqa: E402
from prunekit.layers.targets import find_head, prunable  # noqa: E402


class MobileNetLike(nn.Module):
    """torchvision's mobilenet_v3_small shape in miniature: the head is ``classifier.3``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class HeadFirst(nn.Module):
    """The output layer is registered first: only a forward tells which one it is."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(8, 3)
        self.trunk = nn.Linear(4, 8)

    def forward(self, x):
        return self.out(torch.relu(self.trunk(x)))


def test_mobilenet_like_head_is_classifier_3():
    m = MobileNetLike()
    assert find_head(m) == "classifier.3"
    assert list(find_targets(m)) == ["features.0", "features.3", "classifier.0"]
    found = prunable(m)
    assert found.head == "classifier.3" and list(found.skipped) == ["classifier.3"]


def test_head_by_forward_order_when_inputs_are_given():
    m = HeadFirst()
    assert find_head(m, example_inputs=torch.randn(2, 4)) == "out"
    assert list(find_targets(m, example_inputs=torch.randn(2, 4))) == ["trunk"]
    assert find_head(m) == "trunk"  # without inputs: the last one registered
    # inputs that do not fit: the registration order, and no error here
    assert find_head(m, example_inputs=torch.randn(2, 5)) == "trunk"


def test_compiled_and_data_parallel_wrappers():
    m = MobileNetLike()
    compiled = torch.compile(m)  # compiles lazily: nothing runs here
    assert list(find_targets(compiled)) == ["_orig_mod.features.0", "_orig_mod.features.3", "_orig_mod.classifier.0"]
    # a forward to find the head runs the plain module (no compilation)
    assert find_head(compiled, example_inputs=torch.randn(2, 3, 8, 8)) == "_orig_mod.classifier.3"
    assert list(find_targets(nn.DataParallel(m))) == ["module.features.0", "module.features.3", "module.classifier.0"]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    pruner = pk.MagnitudePruner(compiled, opt, 0.5)
    assert list(pruner.targets) == ["features.0", "features.3", "classifier.0"]


def test_plain_sequential_and_single_layer():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_head(mlp) == "2"
    assert list(find_targets(mlp, include_head=True)) == ["0", "2"]
    assert find_head(nn.Linear(3, 4)) is None  # a model that is one layer is not its own head
    assert list(find_targets(nn.Linear(3, 4))) == [""]
    assert list(find_targets(torch.compile(nn.Linear(3, 4)))) == ["_orig_mod"]


def _bert_classifier():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_transformers_models_from_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    untied = transformers.LlamaForCausalLM(cfg)
    assert find_head(untied) == "lm_head"
    assert "lm_head" not in find_targets(untied) and "model.layers.0.mlp.down_proj" in find_targets(untied)
    cfg.tie_word_embeddings = True
    tied = transformers.LlamaForCausalLM(cfg)
    assert find_head(tied) is None  # the tied head is no target; the last MLP layer is not a head
    assert list(find_targets(tied))[-1] == "model.layers.0.mlp.down_proj"
    bert = _bert_classifier()  # no output embeddings: the last layer to run, the classifier
    ids = {"input_ids": torch.randint(0, 50, (2, 6))}
    assert find_head(bert, example_inputs=ids) == "classifier" == find_head(bert)
    assert "bert.pooler.dense" in find_targets(bert) and "classifier" not in find_targets(bert)
    assert find_head(bert.bert) is None  # a base model has no head: its pooler is pruned
    assert "pooler.dense" in find_targets(bert.bert)


def test_prune_lists_the_head_and_agrees_with_model_report():
    m = MobileNetLike().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default head rule is listed, not warned about
        result = pk.prune(m, data, sparsity=0.5, method="wanda")
    assert [r.name for r in result.layers] == ["features.0", "features.3", "classifier.0"]
    assert result.skipped == {"classifier.3": HEAD_REASON}
    assert "classifier.3" in result.summary() and "include_head=True" in result.summary()
    assert bool((m.classifier[3].weight != 0).all())
    report = pk.model_report(m)
    assert report.head == "classifier.3"
    assert len(report.layers) == len(result.layers) + len(result.skipped) == 4
    assert "Head: classifier.3" in report.to_terminal()


def test_skipped_layers_warned_once():
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                      nn.Linear(8, 2))
    with pytest.warns(UserWarning) as record:
        result = pk.prune(m, None, pattern="4:8", method="magnitude")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "left 2 layers dense" in messages[0]
    assert "'0': input dimension 6 is not a multiple of 8" in messages[0] and "'2': input dimension 12" in messages[0]
    assert [r.name for r in result.layers] == ["4"]
    assert list(result.skipped) == ["6", "0", "2"]
    assert all(name in result.summary() for name in result.skipped)


# -- models already pruned with torch.nn.utils.prune / parametrize ------------------------------
def _prepruned(kind: str) -> nn.Module:
    from torch.nn.utils import parametrize
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    if kind == "prune":
        torch_prune.l1_unstructured(m[2], "weight", amount=0.3)
    else:
        class Half(nn.Module):
            def forward(self, w):
                return w * 0.5
        parametrize.register_parametrization(m[2], "weight", Half())
    return m


@pytest.mark.parametrize("kind,fix", [("prune", r"torch\.nn\.utils\.prune\.remove\(model\.get_submodule\('2'\), 'weight'\)"),
                                      ("parametrize", r"remove_parametrizations\(model\.get_submodule\('2'\), 'weight'\)")])
def test_prepruned_models_are_refused_unchanged(kind, fix):
    m = _prepruned(kind)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=f"layer '2' .*{fix}"):
        pk.prune(m, [torch.randn(4, 8)], sparsity=0.5, method="sparsegpt")
    with pytest.raises(ValueError, match=f"layer '2' .*{fix}"):
        pk.MagnitudePruner(m, torch.optim.SGD(m.parameters(), lr=0.1), 0.5)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # excluded, the pre-pruned layer is no obstacle
    pk.prune(m, None, sparsity=0.5, method="magnitude", exclude="^2$")
