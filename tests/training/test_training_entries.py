"""The training pruners see prune()'s layer kinds (prunekit.training.entries): the same targets,
the same misfit warning and strict rule at construction, and masks equal to a brute-force
magnitude ranking of each unit (attention's q/k/v/out_proj, each group of a grouped
convolution, transformers' Conv1D on its transposed weight)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.training import STR, MagnitudePruner, SoftThreshold
from prunekit.training.entries import unit_modules


class Stem(nn.Module):
    """A CNN whose 3-channel stem cannot hold 2:4 (27 input columns), a grouped and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.grouped = nn.Conv2d(16, 16, 3, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.grouped(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.attn(x, x, x)[0])))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _brute_unstructured(matrix: torch.Tensor, s: float) -> torch.Tensor:
    """Keep all but the round(s*n) smallest magnitudes (no ties with random weights)."""
    flat = matrix.abs().reshape(-1)
    k = round(s * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[sorted(range(flat.numel()), key=lambda i: float(flat[i]))[:k]] = False
    return keep.view_as(matrix)


def _brute_nm(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, of each m consecutive input columns keep the n largest magnitudes."""
    keep = torch.zeros_like(matrix, dtype=torch.bool)
    for r in range(matrix.shape[0]):
        for c in range(0, matrix.shape[1], m):
            order = sorted(range(m), key=lambda j: -float(matrix[r, c + j].abs()))
            for j in order[:n]:
                keep[r, c + j] = True
    return keep


def _conv_matrix(w: torch.Tensor) -> torch.Tensor:
    """[C_out, k*C_in] with columns (kernel position, input channel): prune()'s layout."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def test_stem_is_skipped_at_construction_with_prunes_warning():
    torch.manual_seed(0)
    model = Stem()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning) as theirs:
        result = pk.prune(reference, sparsity=0.5, pattern="2:4", method="magnitude")
    with pytest.warns(UserWarning) as ours:
        pruner = MagnitudePruner(model, _sgd(model), 0.5, pattern="2:4")
    mine = [str(w.message) for w in ours if "left" in str(w.message)]
    assert mine and mine == [str(w.message) for w in theirs if "left" in str(w.message)]
    assert "'stem'" in mine[0] and "'depthwise'" in mine[0]
    assert list(pruner.targets) == ["grouped", "fc"]
    assert set(unit_modules(pruner.entries)) == {r.name for r in result.layers}
    assert torch.equal(model.grouped.weight != 0, reference.grouped.weight != 0)  # prune()'s 2:4 magnitude masks
    opt = pruner.optimizer
    for _ in range(2):  # training runs: no N:M error at step 1
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        pruner.step()
    assert torch.count_nonzero(model.stem.weight) == model.stem.weight.numel()
    # the grouped conv holds 2:4 along each group's input channels at every kernel position
    mat = _conv_matrix(model.grouped.weight.detach())
    assert torch.equal((mat != 0).reshape(16, -1, 4).sum(-1), torch.full((16, mat.shape[1] // 4), 2))


def test_strict_raises_at_construction_and_changes_nothing():
    torch.manual_seed(0)
    model = Stem()
    opt = _sgd(model)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()  # momentum buffers exist
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="layer 'stem' cannot be pruned with pattern 2:4.*strict=False"):
        MagnitudePruner(model, opt, 0.5, pattern="2:4", strict=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = opt.state_dict()["state"]
    assert all(torch.equal(opt_before["state"][i]["momentum_buffer"], state[i]["momentum_buffer"]) for i in state)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(TypeError, match="strict"):
        MagnitudePruner(model, opt, 0.5, strict="yes")


def test_targets_and_units_equal_prunes():
    torch.manual_seed(0)
    for model in (Stem(), Attn()):
        reference = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = pk.prune(reference, sparsity=0.5, method="magnitude")
        pruner = MagnitudePruner(model, _sgd(model), 0.5)
        assert set(unit_modules(pruner.entries)) == {r.name for r in result.layers}
        assert {n for n, _ in unit_modules(pruner.entries).values()} == {r.name.split(".")[0] for r in result.layers}
        # magnitude both ways: the same zeros
        ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(p == 0, ref[name] == 0), name


def test_attention_qkv_and_out_proj_each_pruned_by_magnitude():
    torch.manual_seed(0)
    model = Attn()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = MagnitudePruner(model, _sgd(model), 0.5)
    assert list(pruner.entries) == ["attn.in_proj_weight", "attn.out_proj.weight", "fc"]
    w0 = dense["attn.in_proj_weight"]
    for i in range(3):  # q, k, v: each its own unit at exactly 50%
        rows = slice(16 * i, 16 * (i + 1))
        assert torch.equal(model.attn.in_proj_weight[rows] != 0, _brute_unstructured(w0[rows], 0.5))
    assert torch.equal(model.attn.out_proj.weight != 0, _brute_unstructured(dense["attn.out_proj.weight"], 0.5))
    assert torch.equal(pruner.masks()["attn.in_proj_weight"], model.attn.in_proj_weight != 0)
    assert pruner.masks().verify(model)
    # resume sparse fine-tuning from the model's zeros, keyed as the pruner keys its masks
    again = Attn()
    again.load_state_dict(model.state_dict())
    resumed = MagnitudePruner(again, _sgd(again), 0.5, masks=pk.MaskSet.from_model(again, list(pruner.weights)))
    assert all(torch.equal(resumed.masks()[k], m) for k, m in pruner.masks().items())


def test_grouped_conv_units_are_its_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 9, 1, groups=1), nn.Conv2d(9, 4, 1))
    dense = model[0].weight.detach().clone()
    MagnitudePruner(model, _sgd(model), 0.5)
    mat, kept = _conv_matrix(dense), _conv_matrix(model[0].weight.detach()) != 0
    for g in range(2):  # each group its own ranking, 18 of 36 pruned
        assert torch.equal(kept[4 * g:4 * (g + 1)], _brute_unstructured(mat[4 * g:4 * (g + 1)], 0.5))


def test_depthwise_prunes_exactly_half_of_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 5, 3, groups=5), nn.Conv2d(5, 4, 1))
    MagnitudePruner(model, _sgd(model), 0.5)
    # 45 weights, 5 groups of 9: round(0.5 * 45) = 22 zeros in all, as prune() spreads them
    assert int((model[0].weight == 0).sum()) == 22


def test_soft_threshold_pruners_run_attention_on_thresholded_qkv():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for make in (lambda m, o: SoftThreshold(m, o, total_steps=4, final_threshold=0.1, schedule="constant"),
                 lambda m, o: STR(m, o, s_init=-2.0)):
        model = Attn()
        pruner = make(model, _sgd(model))
        d = pruner.threshold if isinstance(pruner, SoftThreshold) else pruner.thresholds()["attn.in_proj_weight"]
        oracle = copy.deepcopy(model)
        with torch.no_grad():  # the forward the pruner must run: every entry soft-thresholded
            for name, p in oracle.named_parameters():
                key = {"attn.in_proj_weight": "attn.in_proj_weight", "attn.out_proj.weight": "attn.out_proj.weight",
                       "fc.weight": "fc"}.get(name)
                if key is not None:
                    t = pruner.threshold if isinstance(pruner, SoftThreshold) else pruner.thresholds()[key]
                    p.sub_(p.clamp(-t, t))
        assert d > 0
        out = model(x)
        torch.testing.assert_close(out, oracle(x), rtol=1e-5, atol=1e-6)
        out.sum().backward()
        assert model.attn.in_proj_weight.grad is not None
        assert model.attn.out_proj.weight.grad is not None
        assert isinstance(model.attn.in_proj_weight, nn.Parameter)  # the shadow is gone after the forward
        pruner.finalize()
        assert torch.count_nonzero(model.attn.in_proj_weight) < model.attn.in_proj_weight.numel()


def test_gpt2_conv1d_taken_by_default_and_nm_along_its_input():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    reference = copy.deepcopy(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = MagnitudePruner(model, _sgd(model), 0.5, pattern="2:4")
    result = pk.prune(reference, sparsity=0.5, pattern="2:4", method="magnitude")
    assert set(pruner.targets) == {r.name for r in result.layers} == {
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"}
    for name in pruner.targets:
        w0 = dense[f"{name}.weight"]  # [d_in, d_out]: groups of 4 run along d_in
        kept = model.get_submodule(name).weight != 0
        assert torch.equal(kept.T, _brute_nm(w0.T, 2, 4)), name


def test_out_proj_alone_is_refused_naming_the_attention():
    model = Attn()
    opt = _sgd(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'attn.out_proj' is read by 'attn'.*targets=\['attn'\]"):
        STR(model, opt, targets=["attn.out_proj", "fc"])
    assert len(opt.param_groups) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruner = MagnitudePruner(model, opt, 0.5, targets=["attn"])
    assert list(pruner.entries) == ["attn.in_proj_weight", "attn.out_proj.weight"]


def test_a_kind_of_ones_own_is_pruned_during_training():
    from prunekit.layers.base import LayerKind, register_kind, unregister_kind

    class TLinear(nn.Module):
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_in, d_out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    class TransposedKind(LayerKind):
        name = "transposed-training-test"
        types = (TLinear,)

        def matrix(self, module, unit=""):
            return module.weight.detach().T

        def weight_mask(self, module, mask, unit=""):
            return mask.T

    register_kind(TransposedKind())
    try:
        torch.manual_seed(0)
        net = nn.Sequential(TLinear(8, 6), nn.ReLU(), nn.Linear(6, 2))
        dense = net[0].weight.detach().clone()
        pruner = MagnitudePruner(net, _sgd(net), 0.5, pattern="2:4")
        assert list(pruner.targets) == ["0"]
        assert torch.equal((net[0].weight != 0).T, _brute_nm(dense.T, 2, 4))
        net = nn.Sequential(TLinear(8, 6), nn.ReLU(), nn.Linear(6, 2))
        pruner = SoftThreshold(net, _sgd(net), total_steps=2, final_threshold=0.5, schedule="constant")
        x = torch.randn(3, 8)
        expected = torch.relu(x @ (net[0].weight - net[0].weight.clamp(-0.5, 0.5))) @ net[2].weight.T + net[2].bias
        torch.testing.assert_close(net(x), expected)
    finally:
        unregister_kind("transposed-training-test")


def test_fsdp2_shards_grouped_conv_as_one_layer_and_refuse_attention(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not already initialized")
    from prunekit.training.entries import build_entries

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (1,))
        conv, attn = nn.Conv2d(8, 8, 3, groups=2), nn.MultiheadAttention(8, 2)
        conv.weight = nn.Parameter(distribute_tensor(conv.weight.detach(), mesh, [Shard(0)]))
        attn.in_proj_weight = nn.Parameter(distribute_tensor(attn.in_proj_weight.detach(), mesh, [Shard(0)]))
        entry = build_entries({"conv": conv})["conv"]
        assert entry.simple and entry.units == ("",)
        with pytest.raises(ValueError, match=r"attn.in_proj_weight \(attention layer\) is sharded"):
            build_entries({"attn": attn})
    finally:
        dist.destroy_process_group()
