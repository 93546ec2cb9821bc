"""Review 30 (revstate30): adversarial review of the saved-state changes of ``audit-state30``.

A state that ``save`` wrote loads; the refusals added today keep every legitimate state (earlier formats, masked
or skipped rows, every precision and row dtype, both CPU paths) and resuming equals the saved accumulator going
on bit for bit; errors say what to do.
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError
from spectral_lens._warnings import StateFormatError
from support.state import assert_same_state, snapshot

A = ActivationCovarianceAccumulator


def _nan_first_update(nonfinite="raise", **kw) -> ActivationCovarianceAccumulator:
    """An accumulator whose first update held a NaN row: under ``"raise"`` the rows (and the shift, a mean
    of them) are summed as they are, and ``compute`` names the update."""
    acc = A(4, nonfinite=nonfinite, **kw)
    x = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = float("nan")
    acc.update(x)
    return acc


def _same_bits(a: dict, b: dict) -> bool:
    """Two states equal field by field, tensors bit for bit (NaN included, where ``torch.equal`` says no)."""
    def bits(v):
        return v.view(torch.int64) if v.dtype == torch.float64 else v
    return a.keys() == b.keys() and all(
        torch.equal(bits(a[k]), bits(b[k])) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------- bugs fixed
@pytest.mark.parametrize("how", ["to", "load_state_dict", "save/load"])
def test_a_state_with_nan_rows_under_raise_moves_and_loads_and_still_names_the_update(tmp_path, how):
    """NaN rows in the first update make the shift NaN: ``acc.to(device)`` (and ``capture.to``) raised
    ``StateFormatError: cannot load state_dict: shift is not finite``, and a file ``save`` wrote was refused by
    ``load``, where ``compute`` says which update held the NaN rows."""
    acc = _nan_first_update()
    assert not bool(torch.isfinite(acc.state_dict()["shift"]).all())  # the case: a non-finite shift
    before, live = snapshot(acc), copy.deepcopy(acc)
    if how == "to":
        got = acc.to("cpu")
        assert _same_bits(snapshot(got), before)
    elif how == "load_state_dict":
        got = A(4)
        got.load_state_dict(acc.state_dict())
    else:
        got = A.load(acc.save(tmp_path / "nan"))
    assert _same_bits(snapshot(got), before)
    with pytest.raises(NonFiniteError, match=r"non-finite values \(NaN/Inf\) in the rows of update #0"):
        got.compute()
    x = torch.randn(3, 4, dtype=torch.float64)
    got.update(x)  # goes on as the live one does
    live.update(x)
    assert _same_bits(snapshot(got), snapshot(live)) and got.n_rows == 13


@pytest.mark.parametrize("state", ["no bad rows recorded", "skip policy"])
def test_a_non_finite_shift_without_nan_rows_recorded_is_still_refused(state):
    """The guard of the fix above: a NaN shift in a state that records no NaN/Inf rows under ``"raise"``
    (a tampered state; under ``"skip"`` such rows are dropped, the shift never holds them) stays refused."""
    if state == "skip policy":
        sd = {**_nan_first_update("skip").state_dict(), "shift": torch.full((4,), float("nan"), dtype=torch.float64)}
        live = A(4, nonfinite="skip")
    else:
        sd = {**_nan_first_update().state_dict(), "first_bad": torch.tensor(-1)}
        live = A(4)
    live.update(torch.randn(6, 4, dtype=torch.float64))
    before = snapshot(live)
    with pytest.raises(StateFormatError, match="shift is not finite"):
        live.load_state_dict(sd)
    assert_same_state(snapshot(live), before)
