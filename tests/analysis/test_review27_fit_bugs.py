"""Review 27 (fit): defects found checking the summaries against the protocol, each with its failing-first test.

* ``TailPredictor(window=...)`` and ``resolve_window(run, window)`` passed the window through ``int()``: a
  fractional window such as ``(0.1, 0.2)`` became ``(0, 0)``, ``(100.7, 200.2)`` silently became
  ``(100, 200)``, ``(True, 5)`` became ``(1, 5)`` and ``(200, 100)`` was accepted until a fit failed;
  ``BandAlphaFitter`` refuses all of these by the same rule (``window_ranks``).
* The effective ranks counted only float64 round-off negatives as 0 (``-1e-10`` of the largest):
  ``RankMe()(torch.linalg.eigvalsh(C))`` of a float32 covariance of fewer rows than dimensions raised,
  although its negatives (measured 3.5e-9 to 4e-8 of the largest, d = 128-4,096) are the solver's
  round-off, which the tolerance exists to accept.
* ``band_alpha`` on a window holding a negative eigenvalue said it "reaches zero eigenvalues: only N are
  nonzero" (the negatives are nonzero) without naming the value or its rank.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spectral_lens import RankMe, participation_ratio, stable_rank, tail_window
from spectral_lens.analysis import SweepController, TailPredictor, early_alpha, resolve_window
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import open_runs
from spectral_lens.spectra import band_alpha
from spectral_lens.spectra.ranks import rankme

BAD_WINDOWS = [
    ((0.1, 0.2), r"\(0\.1, 0\.2\).*integers.*fractions"),
    ((100.7, 200.2), r"\(100\.7, 200\.2\).*integers"),
    ((100.0, 200.0), r"\(100\.0, 200\.0\).*integers"),
    ((True, 5), r"\(True, 5\).*integers"),
    ((200, 100), r"\(200, 100\).*1 <= lo < hi"),
    ((0, 10), r"\(0, 10\).*1 <= lo < hi"),
    ("ab", r"'ab'"),
]


def _run(n_layer=12, recorded=None):
    info = SimpleNamespace(n_layer=n_layer, family="f", batch_tier=1, primary_spectrum=None, total_tokens=None)
    return SimpleNamespace(run_id="r", summary_windows={"tail": recorded} if recorded else {}, path=None, info=info)


@pytest.mark.parametrize("window, match", BAD_WINDOWS)
def test_tail_predictor_refuses_a_window_that_is_not_integer_ranks_when_built(window, match):
    with pytest.raises(ValueError, match=r"TailPredictor: window " + match):
        TailPredictor(window=window)
    with pytest.raises(ValueError, match=match):
        SweepController(window=window)


@pytest.mark.parametrize("window, match", BAD_WINDOWS)
def test_resolve_window_refuses_a_window_that_is_not_integer_ranks(window, match):
    with pytest.raises(ValueError, match=r"window " + match):
        resolve_window(_run(), window)


def test_early_alpha_names_the_fractional_window_it_was_given(tmp_path):
    write_theorem6_sweep(tmp_path, (2, 4), family="w64", dim=64, grad_dim=16, n_measure=6, n_eval=8,
                         tail_window=(10, 40))
    run = open_runs([tmp_path])[0]
    with pytest.raises(ValueError, match=r"window \(0\.1, 0\.2\).*fractions of the spectrum"):
        early_alpha(run, window=(0.1, 0.2))
    assert early_alpha(run, window=(10, 40)).window == (10, 40)


def test_integer_windows_of_every_kind_still_pass():
    for w in [(100, 200), [100, 200], np.array([100, 200]), (np.int64(100), np.int32(200))]:
        assert TailPredictor(window=w).window == (100, 200)
        got = resolve_window(_run(), w)
        assert got == (100, 200) and all(type(v) is int for v in got)
    assert resolve_window(_run(36)) == (200, 400) and resolve_window(_run(recorded=[10, 40])) == (10, 40)


def _float32_rank_deficient_eigenvalues(d=256, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * torch.arange(1, d + 1, dtype=torch.float32) ** -0.6
    return torch.linalg.eigvalsh(torch.cov(h.T))  # float32, ascending, with round-off negatives


@pytest.mark.parametrize("d, n", [(256, 64), (512, 128)])
def test_effective_ranks_accept_float32_solver_round_off(d, n):
    ev = _float32_rank_deficient_eigenvalues(d, n)
    low, top = float(ev.min()), float(ev.max())
    assert low > -1e-6 * top
    if low >= -1e-10 * top:  # measured -4e-8 here (CPU, seed 0); another LAPACK may round differently
        pytest.skip(f"this solver's float32 round-off ({low / top:.3g} of the largest) is within 1e-10")
    ref = np.clip(ev.double().numpy(), 0, None)
    p = ref / ref.sum()
    p = p[p > 0]
    want = math.exp(-(p * np.log(p)).sum())
    assert RankMe()(ev) == pytest.approx(want, rel=1e-12)
    assert float(rankme(ev)) == pytest.approx(want, rel=1e-12)
    assert participation_ratio(ev) == pytest.approx(ref.sum() ** 2 / (ref**2).sum(), rel=1e-12)
    assert stable_rank(ev) == pytest.approx(ref.sum() / ref.max(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float32_round_off_negative_counts_as_zero(dtype):
    values = torch.tensor([1.0, 0.25, 0.0, -4e-8], dtype=dtype)
    clamped = values.double().clamp_min(0)
    assert RankMe()(values) == pytest.approx(RankMe()(clamped), rel=1e-15)
    assert participation_ratio(values) == pytest.approx(participation_ratio(clamped), rel=1e-15)
    assert stable_rank(values) == pytest.approx(stable_rank(clamped), rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_negative_eigenvalues_beyond_round_off_are_still_refused(dtype):
    with pytest.raises(ValueError, match=r"rankme: the spectrum has a negative eigenvalue -0\.0?1.*largest 1\b"):
        rankme(torch.tensor([1.0, 0.5, -0.01], dtype=dtype))
    # float64 keeps its tolerance: -1e-9 of the largest is no float64 round-off
    if dtype == torch.float64:
        with pytest.raises(ValueError, match="negative eigenvalue"):
            stable_rank(torch.tensor([1.0, -1e-9], dtype=dtype))


def test_band_alpha_names_a_negative_eigenvalue_in_its_window():
    p = np.arange(1, 301.0) ** -1.2
    p /= p.sum()
    p[150:] = -1e-18
    with pytest.raises(ValueError, match=r"window \[100, 200\] holds a negative eigenvalue -1e-18 at rank 151"):
        band_alpha(p, (100, 200))
    p[150:] = 0.0  # zeros keep their message
    with pytest.raises(ValueError, match=r"reaches zero eigenvalues: only 150 are nonzero"):
        band_alpha(p, (100, 200))


@pytest.mark.parametrize("n_layer", [12.5, 36.0, True, "12", None])
def test_tail_window_refuses_a_depth_that_is_not_an_integer(n_layer):
    """12.5 took the d36 window (200, 400) and True the d12 one, silently; "12" raised a bare TypeError."""
    match = r"n_layer must be an integer number of blocks .*got " + re.escape(repr(n_layer))
    with pytest.raises(ValueError, match=match):
        tail_window(n_layer)


def test_tail_window_takes_numpy_integers():
    assert tail_window(np.int64(36)) == (200, 400) and tail_window(np.int32(64)) == (800, 1600)
    with pytest.raises(ValueError, match=r"n_layer must be >= 1, got 0"):
        tail_window(np.int64(0))
