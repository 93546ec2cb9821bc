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


@pytest.mark.skipif(not hasattr(torch.compiler, "_is_exporting_flag"), reason="torch without the export flag")
def test_a_compiled_forward_is_not_taken_for_an_export_where_dynamo_folds_is_exporting(monkeypatch):
    """torch 2.7 to 2.12: Dynamo folds ``torch.compiler.is_exporting()`` to True under ``torch.compile`` as well
    (fixed in later torch by reading the flag), so the capture hooks took every compiled forward for an export and
    read nothing: 0 rows from any model run under ``torch.compile`` (seen on torch 2.8.0, eager, aot_eager and
    inductor backends). What the hook sees there is imitated: compiling, ``is_exporting()`` True, the flag False."""
    from spectral_lens.capture import transformed_forward

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", False)
    assert not transformed_forward()  # a compiled forward: the hooks read it
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)  # what torch.export sets
    assert transformed_forward()
