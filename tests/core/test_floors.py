"""What the declared minimum versions (torch 2.4, numpy 1.24, Python 3.10) needed of the library itself;
run there by tools/check_floors.sh, and here on the development versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator


class _Tagged(torch.Tensor):
    """A tensor subclass that is not a DTensor (what a library's own tensor type, a FakeTensor, ... looks like)."""


def test_a_tensor_subclass_is_measured_when_torch_distributed_tensor_is_imported():
    # torch 2.4: the DTensor check read torch.distributed.tensor.DTensor, which is not there: every tensor
    # subclass (and every DTensor) reached update raised AttributeError instead of being measured (refused)
    pytest.importorskip("torch.distributed.tensor")  # torch 2.4: a package without DTensor (its parallel only)
    rows = np.random.default_rng(0).standard_normal((40, 5)) * [1, 2, 3, 4, 5] + 7
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.from_numpy(rows).as_subclass(_Tagged))
    assert acc.n_rows == 40
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(rows, rowvar=False), rtol=1e-12, atol=1e-12)
