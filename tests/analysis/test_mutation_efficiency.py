"""Tokens-to-target interpolation and transition gains at their edges (found by hand mutation testing).

* ``interpolate=True`` with a non-finite loss at the previous checkpoint (a NaN evaluation, a
  diverged ``inf``): there is no line to cross, so the answer is the checkpoint itself; dropping
  the ``isfinite`` guard returned NaN and the suite did not notice.
* a logged throughput of 0 (``Q`` not positive): ``thr_gain`` / ``g_thr`` are NaN, the token gain
  is still computed; dropping the ``Q > 0`` guard raised instead and the suite did not notice.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spectral_lens.analysis import tokens_to_target, transition_gains
from spectral_lens.records import Measurement, RunInfo, RunRecord


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_interpolation_after_a_non_finite_loss_is_the_checkpoint(bad):
    tokens, losses = [100, 200, 300], [4.0, bad, 3.0]
    assert tokens_to_target((tokens, losses), 3.2, interpolate=True) == 300.0
    assert tokens_to_target((tokens, losses), 3.2) == 300.0
    # the reference case: a finite previous loss interpolates on the straight line (float64 by hand)
    assert tokens_to_target(([200, 300], [3.5, 3.0]), 3.2, interpolate=True) == pytest.approx(200 + 0.3 / 0.5 * 100)


def _record(run_id, losses, throughput):
    ms = [Measurement(step=i, tokens=100 * (i + 1), val_loss=l) for i, l in enumerate(losses)]
    return RunRecord(Path("."), RunInfo(run_id, extras={"throughput": throughput}), [], ms, {})


def test_zero_throughput_gives_nan_throughput_gain_not_an_error():
    a = _record("a", [4.0, 3.5, 3.1], 0.0)
    b = _record("b", [4.0, 3.1, 3.0], 1000.0)
    g = transition_gains(a, b, 3.2)
    assert math.isnan(g.thr_gain) and math.isnan(g.g_thr)
    assert g.tok_gain == pytest.approx(300 / 200 - 1) and g.g_tok == pytest.approx(math.log(1.5))
    g = transition_gains(b, a, 3.2)
    assert math.isnan(g.thr_gain) and math.isnan(g.g_thr)
