"""check_job_fits: channels only on a CNN-like model, mlp/heads not on a CNN without them."""
import pytest
from torch import nn

from prunekit.jobs.job_fit import check_job_fits, is_channel_job
from prunekit.structures.config import StructuredConfig
from prunekit.zoo.models import small_cnn
from prunekit.zoo.vit import vit_mnist

CHANNELS = StructuredConfig(structures="channels", ratio=0.5)
MLP = StructuredConfig(structures="mlp", ratio=0.5)


def test_the_right_structures_pass():
    assert is_channel_job(CHANNELS) and not is_channel_job(MLP) and not is_channel_job(None)
    check_job_fits(small_cnn(width=4), CHANNELS, "cnn")
    check_job_fits(vit_mnist(dim=16, depth=1, heads=2, mlp=16), MLP, "vit")  # convolution + MLPs: fine
    check_job_fits(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), MLP, "mlp")


def test_mlp_or_heads_on_a_cnn_is_refused_naming_the_source():
    for config in (MLP, StructuredConfig(structures="heads", ratio=0.5)):
        with pytest.raises(ValueError, match="^my:cnn has convolutions and no .* use structures=channels"):
            check_job_fits(small_cnn(width=4), config, "my:cnn")


class TinyForCausalLM(nn.Module):
    """Named as transformers names its causal LMs (what prunekit.jobs.loading.is_causal_lm reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.conv = nn.Embedding(10, 4), nn.Conv1d(4, 4, 1)


def test_channels_on_a_transformers_causal_lm_is_refused():
    with pytest.raises(ValueError, match="^structures=channels removes a CNN's channels, and lm is a transformers "
                                         "TinyForCausalLM: use structures mlp"):
        check_job_fits(TinyForCausalLM(), CHANNELS, "lm")
