"""Shared setup for the NanoGPT-zoo tests.

* Makes the repository root importable, so ``import examples.nanogpt`` works under plain ``pytest``.
* Runs each zoo test with one intra-op thread (restored afterwards): the models are tiny, and on a
  busy 2-core machine two OpenMP threads spin-waiting on each other cost several times the CPU.
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
