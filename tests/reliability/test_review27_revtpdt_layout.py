"""Review 27 (revtpdt): :func:`gradient_layout`, the gradient pool's batch sizes the tensor-parallel peers compare
(pure, single process): equal for the same batches (a list or a DataLoader of them, cut by ``gradient_samples``
alike), different for as many samples in other batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from spectral_lens._tensor_parallel import gradient_layout


def _batches(*sizes: int) -> list:
    return [torch.zeros(n, 5, dtype=torch.long) for n in sizes]


def test_the_same_batches_give_the_same_layout_and_other_batches_another():
    assert gradient_layout(_batches(4, 4), None, None) == gradient_layout(_batches(4, 4), None, None)
    assert gradient_layout(_batches(4, 4), None, None) != gradient_layout(_batches(8), None, None)
    assert gradient_layout(_batches(4, 4), None, None) != gradient_layout(_batches(4, 2, 2), None, None)


def test_the_cap_cuts_the_batches_as_the_gradient_pass_does():
    assert gradient_layout(_batches(4, 4, 4), 6, None) == gradient_layout(_batches(4, 2), None, None)
    assert gradient_layout(_batches(4, 4, 4), 8, None) == gradient_layout(_batches(4, 4, 1), 8, None)
    assert gradient_layout(_batches(8), 6, None) != gradient_layout(_batches(4, 4), 6, None)


def test_a_data_loader_has_the_layout_of_its_batches_and_none_without_a_sized_dataset():
    data = TensorDataset(torch.zeros(10, 5, dtype=torch.long))
    assert gradient_layout(DataLoader(data, batch_size=4), None, None) == gradient_layout(_batches(4, 4, 2), None, None)
    assert gradient_layout(DataLoader(data, batch_size=4, drop_last=True), None, None) == \
        gradient_layout(_batches(4, 4), None, None)
    assert gradient_layout(DataLoader(data, batch_size=4), 6, None) == gradient_layout(_batches(4, 2), None, None)
    assert gradient_layout(iter(_batches(4)), None, None) is None
