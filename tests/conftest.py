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
