"""The too-wide tail window warning on rank-deficient activations (noticed by the session-23 docs audit).

A layer 256 wide fed by a 50-token embedding without positions sees at most 50 distinct rows: its covariance has
fewer nonzero eigenvalues than the window needs (50 in exact arithmetic, a hundred more of round-off; the rest
are zero). The warning bounded its advice by the width and the rows only ("hi <= 256"), which the failing window
(100, 200) already was: the advice must use the nonzero eigenvalues.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import spectral_lens as sl


def _lens(tail_window):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 256), nn.Linear(256, 256))
    pool = [torch.randint(0, 50, (10, 100))]  # 1,000 rows of 50 distinct tokens
    return sl.SpectralLens(model, pool=pool, layers=["1"], params=(), tail_window=tail_window)


def test_the_advice_of_a_window_past_the_nonzero_eigenvalues_is_a_window_that_fits():
    with pytest.warns(sl.SpectralLensWarning, match=r"tail window \(100, 200\) does not fit") as got:
        m = _lens((100, 200)).measure(step=0, tokens=0)
    msg = str(next(w.message for w in got if "tail window" in str(w.message)))
    (name, s), = m.spectra.items()
    assert "alpha_tail" not in m.summaries[name] and s.n_nonzero < 200
    assert f"{s.n_nonzero} nonzero" in msg, msg
    bound, lo, hi = map(int, re.search(r"hi <= (\d+) \(e\.g\. \((\d+), (\d+)\)\)", msg).groups())
    assert bound == s.n_nonzero and hi <= bound, msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the example it gives does fit
        assert "alpha_tail" in _lens((lo, hi)).measure(step=0, tokens=0).summaries[name]
