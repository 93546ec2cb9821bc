"""Shared setup for the speedrun tests: repository root importable, one intra-op thread per test.

One thread: the models are tiny, and on a busy 2-core machine two OpenMP threads spin-waiting on each
other cost several times the CPU (as in ``tests/examples``).
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
