"""Phase 5 tests run tiny models: one PyTorch thread is fastest for them, and on a shared 2-core
machine several threads per process thrash each other (10x slower measured). Restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
