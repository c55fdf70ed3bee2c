"""Phase 2 test settings: run PyTorch on one thread while these tests run.

The models in these tests are tiny (tens of thousands of parameters). For such matrices a second
thread costs more in synchronisation than it saves, and on a busy 2-core machine it can make a
training test 10x slower. The previous setting is restored after each test, so tests of other
folders run as configured. Nothing here changes what a test checks.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
