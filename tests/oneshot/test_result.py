"""PruneResult.summary(): a grouped convolution is one row (its groups on request)."""
import re

import torch
from torch import nn

import prunekit as pk


class _Mobile(nn.Module):
    """stem -> depthwise 3x3 (8 groups) -> grouped 3x3 (2 groups) -> pointwise -> head: two
    grouped convolutions in a row, which must stay two rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for conv in (self.stem, self.dw, self.grouped, self.pw):
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def _pruned():
    model = _Mobile()
    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, pk.prune(model, data, sparsity=0.5, method="sparsegpt", progress=False)


def _row(summary: str, name: str) -> list[str]:
    return [line for line in summary.splitlines() if line.startswith(name + " ")]


def test_a_depthwise_conv_is_one_row_with_its_counted_sparsity():
    model, result = _pruned()
    summary = result.summary()
    assert len(result.layers) == 1 + 8 + 2 + 1
    (dw,) = _row(summary, "dw [8 groups]")
    (grouped,) = _row(summary, "grouped [2 groups]")
    assert not re.search(r"weight\[g\d+\]", summary)
    for line, module, shape in ((dw, model.dw, "8 x 1x1x3x3"), (grouped, model.grouped, "2 x 4x4x3x3")):
        counted = float((module.weight == 0).sum()) / module.weight.numel()  # the oracle: the tensor
        assert line.split()[3:7] == [*shape.split(), f"{100 * counted:.2f}%"], line
    errors = [r.error_selected for r in result.layers if r.name.startswith("dw.")]
    assert f"{sum(errors) / 8:.3e}" in dw  # the groups' mean (each group has one output)
    assert "over 4 pruned layers (12 matrices)" in summary


def test_expand_groups_lists_every_group():
    _, result = _pruned()
    summary = result.summary(expand_groups=True)
    assert [bool(_row(summary, f"dw.weight[g{g}]")) for g in range(8)] == [True] * 8
    assert len(_row(summary, "grouped.weight[g1]")) == 1 and "groups]" not in summary
    assert "over 12 pruned layers in" in summary


def test_fused_experts_fold_into_one_row_per_parameter():
    """Reports built by hand: each expert's matrix is a report; the oracle sums them."""
    layers = [pk.LayerReport(f"mlp.experts.{p}[{e}]", (4, 8), s, seconds=1.0)
              for p in ("gate_up_proj", "down_proj") for e, s in enumerate((0.5, 0.25, 0.75))]
    result = pk.PruneResult("wanda", None, "unstructured", 0.5, layers=layers)
    summary = result.summary()
    (gate_up,) = _row(summary, "mlp.experts.gate_up_proj [3 experts]")
    assert gate_up.split()[3:7] == ["3", "x", "4x8", "50.00%"] and "3.00" in gate_up
    assert len(_row(summary, "mlp.experts.down_proj [3 experts]")) == 1 and "proj[1]" not in summary
    assert len(_row(result.summary(expand_groups=True), "mlp.experts.down_proj[2]")) == 1
