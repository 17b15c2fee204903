import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The LQ tests work on tiny matrices: intra-op threads only add fork/join overhead there (and on a
    busy 2-core machine OpenMP spin-waiting makes small SVDs 100x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
