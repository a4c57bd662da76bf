import inspect

import pytest
import torch

from prunekit.sparsity.masks import MaskSet
from prunekit.training.schedules import Cubic
from prunekit.training import STR, MagnitudePruner, PrunerBase, SoftThreshold
from helpers.training_toys import TARGETS, data, make, train_step

INTERFACE = ("step", "masks", "sparsity", "state_dict", "load_state_dict", "finalize", "synchronize")


def build(kind, model, opt, **kw):
    if kind == "magnitude":
        return MagnitudePruner(model, opt, Cubic(0.75, total_steps=20, every=2), targets=TARGETS, **kw)
    if kind == "soft":
        return SoftThreshold(model, opt, total_steps=20, final_threshold=0.08, targets=TARGETS, **kw)
    return STR(model, opt, s_init=-2.5, targets=TARGETS, **kw)


def test_the_base_is_abstract_and_a_pruner_missing_a_method_cannot_be_made():
    with pytest.raises(TypeError, match="abstract"):
        PrunerBase(make(), torch.optim.SGD(make().parameters(), lr=0.1))

    class NoMasks(PrunerBase):
        step = state_dict = load_state_dict = synchronize = _finalize = lambda self, *a: None

    model = make()
    with pytest.raises(TypeError, match="masks"):
        NoMasks(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_every_pruner_has_the_same_interface():
    for cls in (MagnitudePruner, SoftThreshold, STR):
        assert issubclass(cls, PrunerBase) and not cls.__abstractmethods__
        for name in INTERFACE:
            assert hasattr(cls, name), (cls, name)
        assert cls.sparsity is PrunerBase.sparsity  # written once
    assert MagnitudePruner.finalize is SoftThreshold.finalize is STR.finalize is PrunerBase.finalize
    assert list(inspect.signature(PrunerBase.finalize).parameters) == ["self"]


@pytest.mark.parametrize("kind", ["magnitude", "soft", "str"])
def test_masks_sparsity_and_finalize_agree_for_every_pruner(kind):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = build(kind, model, opt)
    x, y = data()
    for _ in range(20):
        train_step(model, opt, pruner, x, y)
    masks = pruner.masks()
    assert isinstance(masks, MaskSet) and list(masks) == TARGETS
    assert all(m.dtype == torch.bool and m.shape == model.get_submodule(n).weight.shape for n, m in masks.items())
    kept = sum(int(m.sum()) for _, m in masks.items())
    assert pruner.sparsity() == 1.0 - kept / 768
    if kind == "magnitude":
        assert 768 - kept == round(0.75 * 512) + round(0.75 * 256)
    final = pruner.finalize()
    assert isinstance(final, MaskSet)
    after = pruner.masks()
    for n in TARGETS:
        nonzero = model.get_submodule(n).weight != 0
        assert torch.equal(final[n], nonzero) and torch.equal(after[n], nonzero), n
    assert pruner.sparsity() == final.sparsity()
    with pytest.raises(RuntimeError, match="after finalize"):
        pruner.finalize()


@pytest.mark.parametrize("kind", ["magnitude", "soft", "str"])
def test_synchronize_is_a_no_op_in_one_process_and_sync_false_is_accepted(kind):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = build(kind, model, opt, sync=False)
    before = pruner.masks()
    assert pruner.synchronize() is None
    assert all(torch.equal(before[n], m) for n, m in pruner.masks().items())


def test_magnitude_masks_is_a_plain_method_returning_a_copy():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = MagnitudePruner(model, opt, 0.5, targets=TARGETS)
    assert inspect.ismethod(pruner.masks)
    copy = pruner.masks()
    assert isinstance(copy, MaskSet) and list(copy) == TARGETS
    copy["0"].zero_()  # a copy: the pruner's own masks do not change
    assert int(pruner.masks()["0"].sum()) == 256


def test_str_final_sparsity_projects_finalize_to_an_exact_count():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = STR(model, opt, s_init=-6.0, final_sparsity=0.6, targets=TARGETS)
    with pytest.raises(TypeError):
        pruner.finalize(0.6)  # finalize() takes no sparsity: it is given to the constructor
    assert not pruner.finalized and len(opt.param_groups) == 2
    masks = pruner.finalize()
    assert len(opt.param_groups) == 1
    assert sum(int((~m).sum()) for _, m in masks.items()) == round(0.6 * 768)
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\)"):
        STR(model, torch.optim.SGD(model.parameters(), lr=0.1), final_sparsity=1.0, targets=TARGETS)


@pytest.mark.parametrize("kind", ["magnitude", "soft", "soft_per_layer", "str"])
def test_a_compiled_model_trains_50_steps_on_at_most_two_graphs(kind):
    """Backend: a counting pass-through (like "eager": dynamo still guards and recompiles); dynamic=False,
    so a threshold read as a Python float would recompile at every change until the limit."""
    torch._dynamo.reset()
    compiles = 0

    def counting_backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm.forward

    runs = []
    for compiled in (False, True):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "soft_per_layer":
            pruner = SoftThreshold(model, opt, total_steps=40, target_sparsity=0.7, budget="uniform",
                                   control_every=5, targets=TARGETS)
        else:
            pruner = build(kind, model, opt)
        run = torch.compile(model, backend=counting_backend, dynamic=False) if compiled else model
        x, y = data()
        for _ in range(50):
            train_step(run, opt, pruner, x, y)
        runs.append((model.state_dict(), pruner.sparsity()))
    assert 1 <= compiles <= 2
    assert runs[1][1] == runs[0][1] > 0.1
    assert all(torch.allclose(v, runs[1][0][k], atol=1e-6) for k, v in runs[0][0].items())
    torch._dynamo.reset()
