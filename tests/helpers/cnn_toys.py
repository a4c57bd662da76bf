"""Small CNNs with every coupling the channel graph follows: concatenation, squeeze-excitation,
flatten -> Linear; and ones it must refuse."""
from __future__ import annotations

import torch
from torch import nn


class ConcatSE(nn.Module):
    """Two branches concatenated (channel offsets), a squeeze-excitation gate on the result,
    a conv, then flatten (7x7 spatial) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se_reduce = nn.Conv2d(8, 4, 1)
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(8, 6, 3, stride=4, padding=1)
        self.fc = nn.Linear(6 * 7 * 7, 10)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        z = torch.relu(self.conv(y * gate))
        return self.fc(torch.flatten(z, 1))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mix(torch.relu(self.stem(x)))))


class Branchy(nn.Module):
    """Data-dependent control flow in a submodule: torch.fx cannot trace ``gate``."""

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = Branchy.Gate()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.stem(x))))


def conv_pair(bias: bool = True) -> nn.Sequential:
    """conv -> BN -> ReLU -> conv: one prunable group (the first conv's outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1, bias=bias))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())


def silence(model, graph, removed):
    """Make the channels ``removed[g]`` output exactly zero after their BatchNorms."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g, chans in removed.items():
            for m in graph.groups[g].members:
                idx = m.index[chans].reshape(-1)
                mod = modules[m.module]
                if m.role in ("out", "dw", "bn"):
                    mod.weight[idx] = 0
                    if mod.bias is not None:
                        mod.bias[idx] = 0


def tiny_cnn() -> nn.Sequential:
    """The zoo's small_cnn at width 4 (a module:factory for recipe and command-line tests)."""
    from prunekit.zoo.models import small_cnn

    torch.manual_seed(0)
    return small_cnn(width=4)


def write_channel_job(folder, **structured) -> str:
    """A recipe file that removes half the multiply-adds of tiny_cnn, next to its 32 random
    images; returns its path."""
    import yaml

    torch.save(torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0)), folder / "x.pt")
    spec = {"model": "helpers.cnn_toys:tiny_cnn", "data": {"tensors": "x.pt", "batch_size": 16},
            "structured": {"structures": "channels", "flops": 0.5, "method": "l2", **structured},
            "output": {"dir": "out", "formats": ["hf"]}}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return str(folder / "job.yaml")


def assert_width_table(widths: dict[str, dict[int, float]], graph) -> None:
    """A measured per-group table (``saved_ms`` or ``error``): every group of ``graph``, its full
    width first at 0, down to one channel, never falling as channels go."""
    assert set(widths) == {g.name for g in graph.groups}
    for g in graph.groups:
        values = widths[g.name]
        kept = sorted(values, reverse=True)
        assert kept[0] == g.count and values[g.count] == 0.0 and kept[-1] == 1
        assert all(values[a] <= values[b] for a, b in zip(kept, kept[1:]))  # narrower never scores lower


def two_groups() -> nn.Sequential:
    """1x1 convs 1 -> 4 -> 4 -> 2: two channel groups of 4 ("0" and "2"), every channel alike within
    a group (equal l2 scores), for checking rankings across groups with hand-made tables."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(0.5)
    return model.eval()
