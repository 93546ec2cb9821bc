"""Review 27 (revfit): an adversarial review of the review-27 fit changes (commit 107b61b).

* ``RankMe`` / ``participation_ratio`` / ``stable_rank`` read a Python list (or scalar sequence) through
  ``torch.as_tensor``, i.e. in torch's default dtype, float32: the float64 values a user typed were rounded
  to float32, ``1e39`` overflowed into "NaN/Inf eigenvalues", and since 107b61b the list also got the float32
  round-off tolerance, so ``stable_rank([1.0, -1e-7])`` returned 1.0 while the same values as a float64
  array were refused. A Python float is a float64: a list now reads as NumPy reads it.
* The float32 tolerance (``sqrt(n) * eps`` of float32, relative to the largest eigenvalue) had no test at
  its edge: ``n * eps``, ``10x`` it, or a tolerance relative to the sum passed every test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectral_lens import RankMe, SweepController, participation_ratio, stable_rank
from spectral_lens.spectra.ranks import NEGATIVE_TOLERANCE, rankme

EPS32 = float(np.finfo(np.float32).eps)
SUMMARIES = [RankMe(), RankMe("singular_values"), participation_ratio, stable_rank]
IDS = ["rankme", "rankme_sv", "participation_ratio", "stable_rank"]


@pytest.mark.parametrize("fn", SUMMARIES, ids=IDS)
def test_a_list_of_python_floats_is_float64_like_the_same_array(fn):
    """Same values, same verdict: a float64 negative of 1e-7 of the largest is no round-off."""
    values = [1.0, 0.5, -1e-7]
    with pytest.raises(ValueError, match=r"negative eigenvalue -1e-07.*1e-10 of the largest.*float64"):
        fn(np.array(values))
    with pytest.raises(ValueError, match=r"negative eigenvalue -1e-07.*1e-10 of the largest.*float64"):
        fn(values)


def test_a_list_keeps_float64_range_and_precision():
    """1e39 is beyond float32 (it read as Inf); 1e-46 below it (it read as 0); 1 + 1e-9 rounded to 1."""
    assert stable_rank([1e39, 1e38]) == pytest.approx(1.1, rel=1e-15)
    assert participation_ratio([1e39, 1e39]) == pytest.approx(2.0, rel=1e-15)
    assert stable_rank([1e-45, 1e-46]) == pytest.approx(1.1, rel=1e-15)
    assert RankMe()([1e39, 1e39, 1e39]) == pytest.approx(3.0, rel=1e-15)
    values = [1.0] + [1e-3 * (1 + 1e-9 * i) for i in range(10)]
    want = math.fsum(values) / max(values)
    assert stable_rank(values) == pytest.approx(want, rel=1e-15)
    assert stable_rank(tuple(values)) == pytest.approx(want, rel=1e-15)


def test_lists_of_other_kinds_keep_their_reading():
    assert stable_rank([4, 2, 2]) == 2.0  # integers
    f32 = [np.float32(1.0), np.float32(-4e-8)]  # NumPy float32 scalars stay float32: their round-off is accepted
    assert stable_rank(f32) == 1.0
    with pytest.raises(TypeError, match=r"stable_rank needs a Spectrum or a 1-D tensor of eigenvalues, got list"):
        stable_rank([True, False])
    for bad in (["a", "b"], [[1.0, 2.0], [3.0]], None, {"a": 1.0}, [1 + 2j]):
        with pytest.raises(TypeError, match=r"needs a Spectrum or a 1-D tensor of eigenvalues"):
            participation_ratio(bad)
    with pytest.raises(ValueError, match=r"expected a 1-D tensor of eigenvalues, got shape \(2, 2\)"):
        RankMe()([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", SUMMARIES, ids=IDS)
def test_the_low_precision_tolerance_is_sqrt_n_eps32_of_the_largest(fn, dtype):
    """At n = 1,024 equal eigenvalues (sum = 1,024 x largest): a negative of 0.7x ``sqrt(n) * eps32`` of the
    largest counts as 0, one of 1.5x is refused (``n * eps`` or a tolerance of the sum would accept it)."""
    n = 1024
    tol = math.sqrt(n) * EPS32  # 3.8e-6
    top = 64.0  # exact in fp16 and bf16
    for factor, accepted in ((0.7, True), (1.5, False)):
        values = torch.full((n,), top, dtype=torch.float64)
        values[-1] = -factor * tol * top
        values = values.to(dtype)
        got = float(values[-1]) / top
        assert (got > -tol) == accepted, (dtype, factor, got)  # the cast kept the side of the edge
        if accepted:
            clamped = values.double().clamp_min(0)
            assert fn(values) == pytest.approx(fn(clamped), rel=1e-15)
        else:
            with pytest.raises(ValueError, match=r"negative eigenvalue.*largest 64\)"):
                fn(values)


def test_float64_keeps_its_own_tolerance_and_a_spectrum_needs_none():
    top = 1.0
    inside = torch.tensor([top, -0.5 * NEGATIVE_TOLERANCE], dtype=torch.float64)
    outside = torch.tensor([top, -2 * NEGATIVE_TOLERANCE], dtype=torch.float64)
    assert float(rankme(inside)) == 1.0
    with pytest.raises(ValueError, match=r"negative eigenvalue -2e-10"):
        rankme(outside)
    # the float32 tolerance of the same n (2) would be 1.7e-7: float64 must not get it
    with pytest.raises(ValueError, match=r"negative eigenvalue"):
        stable_rank(torch.tensor([1.0, -1e-8], dtype=torch.float64))


def test_sweep_controller_names_itself_and_keeps_the_checked_window():
    """``SweepController(window=(0.1, 0.2))`` was refused as "TailPredictor: window ...", a class the caller never
    named, and ``SweepController.window`` kept the unchecked value (a NumPy array stayed an array)."""
    with pytest.raises(ValueError, match=r"^SweepController: window \(0\.1, 0\.2\): ranks must be integers"):
        SweepController(window=(0.1, 0.2))
    ctl = SweepController(window=np.array([100, 200]))
    assert ctl.window == (100, 200) and all(type(v) is int for v in ctl.window)
    assert ctl.predictor.window == (100, 200)
    assert SweepController().window is None
