import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from prunekit.plots import plot_layer_sparsity, plot_metric_vs_sparsity, plot_schedule
from prunekit.report import LayerStat, ModelReport, model_report
from prunekit.training.schedules import Constant, Cubic, Cyclical, ThresholdSchedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    """Check the file is a real PNG and return its pixels (H, W, channels)."""
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert not plt.get_fignums()  # nothing left open in pyplot
    return img


def make_report(n: int) -> ModelReport:
    layers = [LayerStat(f"blocks.{i}.mlp.fc", "Linear", (10, 10), 100, 100 - i % 100, 200, 2 * (100 - i % 100))
              for i in range(n)]
    return ModelReport(layers, 100 * n, sum(s.nonzeros for s in layers))


def test_layer_sparsity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:4] = 0
    out = plot_layer_sparsity(model_report(model), tmp_path / "sub" / "layers.png", title="tiny")
    assert out == tmp_path / "sub" / "layers.png"
    h, w, _ = read_png(out).shape
    assert 150 < h < 1000 and 400 < w < 1500


def test_layer_sparsity_many_layers_grows(tmp_path):
    small = read_png(plot_layer_sparsity(make_report(5), tmp_path / "small.png"))
    big = read_png(plot_layer_sparsity(make_report(250), tmp_path / "big.png"))
    assert big.shape[0] > 5 * small.shape[0] and big.shape[1] == small.shape[1]


def test_layer_sparsity_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no layers"):
        plot_layer_sparsity(ModelReport([]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="ModelReport"):
        plot_layer_sparsity([{"sparsity": 0.5}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


ROWS = [
    {"method": "magnitude", "sparsity": 0.5, "accuracy": 0.91},
    {"method": "magnitude", "sparsity": 0.9, "accuracy": 0.70},
    {"method": "wanda", "sparsity": 0.9, "accuracy": 0.80},
    {"method": "wanda", "sparsity": 0.5, "accuracy": 0.92, "ppl": 12.0},
    {"method": "dense", "accuracy": 0.93},  # no x: skipped
    {"method": "sparsegpt", "sparsity": 0.7, "accuracy": None},  # None: skipped
]


def test_metric_vs_sparsity(tmp_path):
    read_png(plot_metric_vs_sparsity(ROWS, tmp_path / "acc.png", title="accuracy"))
    read_png(plot_metric_vs_sparsity(ROWS, tmp_path / "ppl.png", y="ppl", logy=True, group=None))


def test_metric_vs_sparsity_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'loss'"):
        plot_metric_vs_sparsity(ROWS, tmp_path / "x.png", y="loss")
    with pytest.raises(ValueError, match="'accuracy'"):
        plot_metric_vs_sparsity([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="numbers"):
        plot_metric_vs_sparsity([{"sparsity": "high", "accuracy": 1.0}], tmp_path / "x.png")


def test_schedule_single_and_many(tmp_path):
    n = 1000
    read_png(plot_schedule(Cubic(0.9, n, every=10), n, tmp_path / "gmp.png"))
    read_png(plot_schedule(ThresholdSchedule("s_lats", n), n, tmp_path / "slats.png", label="S-LATS"))
    many = {"GMP": Cubic(0.9, n, every=10), "cyclical": Cyclical(0.9, n, cycles=3, every=10),
            "constant": Constant(0.9), "lambda": lambda t: 0.9 * t / n}
    read_png(plot_schedule(many, n, tmp_path / "many.png", title="GMP vs cyclical"))
    thresholds = {k: ThresholdSchedule(k, n, beta=0.5 if k == "pgh" else None) for k in ("s_lats", "pgh", "sine")}
    read_png(plot_schedule(thresholds, n, tmp_path / "thresholds.png"))
    read_png(plot_schedule(Cubic(0.9, 200_000), 200_000, tmp_path / "long.png"))  # sampled, still quick


def test_schedule_bad_input(tmp_path):
    with pytest.raises(ValueError, match="total_steps"):
        plot_schedule(Constant(0.5), 0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_schedule({}, 10, tmp_path / "x.png")
    with pytest.raises(ValueError, match="callable"):
        plot_schedule({"bad": 0.5}, 10, tmp_path / "x.png")
    with pytest.raises(ValueError, match="exact_lats"):
        plot_schedule(ThresholdSchedule("exact_lats", 10), 10, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
