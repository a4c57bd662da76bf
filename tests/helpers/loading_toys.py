"""Tiny models for the loading and recipe tests, imported as ``loading_toys:factory``, and a job."""
import torch
import yaml
from torch import nn


def tiny_mlp(width: int = 16, classes: int = 4) -> nn.Module:
    """An 8 -> width -> width -> classes MLP (deterministic weights)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def mlp_block(width: int = 16) -> nn.Module:
    """8 -> [8 -> width -> 8] -> 4: an nn.Sequential MLP block (a structure: its width neurons)
    inside the model's blocks, so structured pruning can remove its neurons (deterministic weights)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 8)),
                         nn.ReLU(), nn.Linear(8, 4))


def not_a_model(**_):
    return "not a model"


NOT_CALLABLE = 3


class _Slow(nn.Module):
    """Sleeps in every forward, so that a test can interrupt pruning while it runs."""

    def forward(self, x):
        import time

        time.sleep(0.05)
        return x


def slow_mlp(marker: str = "") -> nn.Module:
    """tiny_mlp with a sleep in every forward; writes ``marker`` once built (the test's cue)."""
    model = tiny_mlp()
    model.insert(1, _Slow())
    if marker:
        open(marker, "w").close()
    return model


def write_job(tmp_path, data=None, **prune):
    """A recipe file for the tiny MLP with tensor data, next to its data (``data``: more of the
    recipe's data options); returns its path."""
    torch.save(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), tmp_path / "x.pt")
    spec = {"model": "helpers.loading_toys:tiny_mlp",
            "data": {"tensors": "x.pt", "batch_size": 16, **(data or {})},
            "prune": {"method": "wanda", "sparsity": 0.5, "include_head": True, **prune},
            "output": {"dir": "out", "formats": ["hf", "compressed"]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def write_structured_job(tmp_path, **structured):
    """A recipe file that removes half the neurons of mlp_block's MLP, next to its data; returns its path."""
    torch.save(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), tmp_path / "x.pt")
    spec = {"model": "helpers.loading_toys:mlp_block", "data": {"tensors": "x.pt", "batch_size": 16},
            "structured": {"structures": "mlp", "ratio": 0.5, **structured},
            "output": {"dir": "out", "formats": ["hf"]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
