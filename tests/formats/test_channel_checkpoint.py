"""save_channels / load_channels: a channel-pruned model reloads with exactly its outputs; bad
folders and mismatched architectures are refused naming the module, the given model untouched."""
import json
import os

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.formats.channels import EXPORTED, SHAPES, WEIGHTS, read_record
from prunekit.zoo.mobilenet import mobilenet_v1_mnist
from prunekit.zoo.models import resnet_mnist, small_cnn
from prunekit.zoo.vit import vit_mnist

CALIB = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(9))


def pruned(factory, **options):
    torch.manual_seed(0)
    model = factory().eval()
    pk.prune_channels(model, CALIB, **{"ratio": 0.5, "refine": None, **options})
    return model.eval()


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("factory", [lambda: small_cnn(width=8), lambda: resnet_mnist(width=4), mobilenet_v1_mnist],
                         ids=["small_cnn", "resnet_mnist", "mobilenet_v1_mnist"])
def test_a_channel_pruned_zoo_model_reloads_with_exactly_its_outputs(tmp_path, factory):
    model = pruned(factory)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in factory().parameters())
    assert pk.save_channels(model, tmp_path, example_inputs=X) == [WEIGHTS, SHAPES]
    back = pk.load_channels(tmp_path, factory)
    assert not back.training and same_state(back, model)
    with torch.no_grad():
        assert torch.equal(back(X), model(X))
    assert read_record(tmp_path)["input_shape"] == [1, 28, 28]


def test_a_refit_model_into_a_given_module_and_every_size_attribute(tmp_path):
    model = pruned(lambda: small_cnn(width=8), refine="lstsq", score="wanda")
    pk.save_channels(model, tmp_path)
    target = small_cnn(width=8)
    back = pk.load_channels(tmp_path, target)
    assert back is target
    for (name, a), (_, b) in zip(model.named_modules(), back.named_modules()):
        for attr in ("in_channels", "out_channels", "num_features", "in_features", "out_features"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (name, attr)
    with torch.no_grad():
        assert torch.equal(back(X), model(X))


def test_pruned_attention_heads_reload_through_the_drop_in(tmp_path):
    """nn.MultiheadAttention that lost heads is a PrunedMultiheadAttention: rebuilt from the dense one."""
    factory = lambda: vit_mnist(dim=16, depth=1, heads=4, mlp=32, patch=7)  # noqa: E731
    torch.manual_seed(0)
    model = factory().eval()
    pk.prune_structured(model, CALIB, structures="heads,mlp", ratio=0.5, method="magnitude", refine=None)
    assert model[1].attn.num_heads == 2
    pk.save_channels(model, tmp_path)
    back = pk.load_channels(tmp_path, factory)
    assert type(back[1].attn) is type(model[1].attn) and back[1].attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(back(X), model(X))


@pytest.mark.slow  # torch.export's first call costs ~4 s (dynamo warming up), whatever the model
def test_torch_export_program_runs_without_the_model_code(tmp_path):
    model = pruned(mobilenet_v1_mnist)
    assert EXPORTED in pk.save_channels(model, tmp_path, example_inputs=X, export=True)
    program = torch.export.load(str(tmp_path / EXPORTED)).module()
    with torch.no_grad():
        torch.testing.assert_close(program(X), model(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="export=True needs example_inputs"):
        pk.save_channels(model, tmp_path / "other", export=True)


def test_a_folder_that_is_not_a_channel_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        pk.load_channels(tmp_path / "nowhere", small_cnn)
    with pytest.raises(ValueError, match="is not a prunekit channel checkpoint"):
        pk.load_channels(tmp_path, small_cnn)
    (tmp_path / SHAPES).write_text(json.dumps({"format": "something-else", "modules": {}}))
    with pytest.raises(ValueError, match="not a prunekit channel record"):
        pk.load_channels(tmp_path, small_cnn)
    pk.save_channels(pruned(lambda: small_cnn(width=8)), tmp_path / "ok")
    with pytest.raises(TypeError, match="build_dense_model must be an nn.Module or a callable"):
        pk.load_channels(tmp_path / "ok", "small_cnn")


@pytest.mark.parametrize("other,module", [(lambda: resnet_mnist(width=4), "module '1.conv1' .* is not in the checkpoint"),
                                          (lambda: nn.Sequential(*small_cnn(width=8)[:4]), "has module '4.fc'")])
def test_a_mismatched_architecture_is_named_and_the_given_model_is_unchanged(tmp_path, other, module):
    pk.save_channels(pruned(lambda: small_cnn(width=8)), tmp_path)
    target = other()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sizes = [(m.__dict__.get("out_channels"), m.__dict__.get("num_features")) for m in target.modules()]
    with pytest.raises(ValueError, match=module):
        pk.load_channels(tmp_path, target)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sizes == [(m.__dict__.get("out_channels"), m.__dict__.get("num_features")) for m in target.modules()]


def test_a_class_that_differs_is_named(tmp_path):
    pk.save_channels(pruned(lambda: small_cnn(width=8)), tmp_path)
    target = small_cnn(width=8)
    target[4].fc = nn.Bilinear(64, 64, 10)  # same name, another class
    with pytest.raises(ValueError, match="module '4.fc' is a torch.nn.modules.linear.Bilinear"):
        pk.load_channels(tmp_path, target)
    assert os.path.isfile(tmp_path / WEIGHTS)
