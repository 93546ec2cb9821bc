"""Review 29 (revdriver): the Hugging Face callback's label-smoothing warning (the probe's own ``label_smoothing``
differs from the trainer's: the gradient spectra measure another loss than the one trained) is given once, at rank
0's agreed work of a measurement (:meth:`LensDriver.warn_on_rank0` with ``once=True``).

Before: the callback set its once-flag when it queued the warning, and the driver drops the queued warnings of a
measurement that is skipped (non-finite, a closed writer) or raises; the flag stayed set, so the user never saw the
warning (a diverged first measurement, then finite ones; a run that raised, then ``train()`` again with the same
callback). Now it is queued again at each measurement until one gave it, and never twice.
"""

from __future__ import annotations

import types
import warnings

import pytest
from support.models import TinyGPT, lm_batch

from spectral_lens import PerSampleGradientProbe, SpectralLens
from spectral_lens._warnings import NonFiniteError, SpectralLensWarning

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from spectral_lens.integrations import SpectralLensCallback

PARAM = "transformer.h.1.attn.c_proj.weight"
SAID = "built with label_smoothing=0.05"


def _callback():
    model = TinyGPT().eval()
    probe = PerSampleGradientProbe(model, PARAM, label_smoothing=0.05)
    lens = SpectralLens(model, [lm_batch(m=2)], layers=["transformer.h.1"], probe=probe, progress=False,
                        tail_window=(4, 16))
    args = types.SimpleNamespace(label_smoothing_factor=0.0)  # the trainer does not smooth
    return SpectralLensCallback(lens), args


def _measure(callback, args, step: int) -> int:
    """One measurement of the callback at ``step`` (a plain callback: no trainer); the smoothing warnings given."""
    state = types.SimpleNamespace(global_step=step, num_input_tokens_seen=0, log_history=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            callback._measure(state, args)
        except RuntimeError:
            pass
    return sum(issubclass(w.category, SpectralLensWarning) and SAID in str(w.message) for w in caught)


def _failing_once(lens, error):
    real, calls = lens.measure, []

    def measure(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*a, **k)

    lens.measure = measure


@pytest.mark.parametrize("first", ["nonfinite", "raises", "closed_writer"])
def test_the_smoothing_warning_is_given_after_a_skipped_or_failed_first_measurement(first, tmp_path):
    callback, args = _callback()
    lens = callback.driver.lens
    if first == "nonfinite":  # a diverged measurement: skipped, the training goes on
        _failing_once(lens, NonFiniteError("non-finite hidden states (simulated)"))
    elif first == "raises":  # the run ends with it (then train() again with the same callback)
        _failing_once(lens, RuntimeError("out of memory (simulated)"))
    else:  # the user closed the run record, evaluated, then gave the lens a new one
        from spectral_lens.records import RunInfo, RunWriter

        lens.writer = RunWriter(tmp_path / "old", RunInfo("r", total_tokens=100), fsync=False)
        lens.writer.close()
    assert _measure(callback, args, 1) == 0  # nothing measured: nothing said (about that measurement)
    if first == "closed_writer":
        lens.writer = None
    assert _measure(callback, args, 2) == 1  # before: 0 (the flag was set at step 1, the warning dropped)
    assert _measure(callback, args, 3) == 0  # once
    assert [m.step for m in lens.history] == [2, 3]


def test_the_smoothing_warning_raised_as_an_error_counts_as_given():
    """Under ``-W error`` the warning raises at the measurement's agreed work (on every rank: the agreement); the
    user saw it, so the next measurement does not raise it again."""
    callback, args = _callback()
    state = types.SimpleNamespace(global_step=1, num_input_tokens_seen=0, log_history=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralLensWarning)
        with pytest.raises(SpectralLensWarning, match=SAID):
            callback._measure(state, args)
    assert _measure(callback, args, 2) == 0
