import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test models are tiny: on a shared 2-core machine OpenMP's thread barriers cost more than the work
    (5-50x slower measured), so every test module runs on one thread and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
