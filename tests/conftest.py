"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread. torchrun runs each worker with OMP_NUM_THREADS=1, so tests that
    compare bits with a worker need it; tiny matmuls are also much faster on one thread when other
    processes share the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
