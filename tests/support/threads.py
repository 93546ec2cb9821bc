"""One intra-op thread per test, restored afterwards.

The example models are tiny; on a busy 2-core machine two OpenMP threads spin-waiting on each other
cost several times the CPU. Import the fixture into a ``conftest.py`` (or a test module) to apply it
to every test there: ``from support.threads import one_intra_op_thread  # noqa: F401``.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
