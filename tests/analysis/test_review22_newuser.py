"""A new user's small model: the recorded tail window is wider than the spectrum (review 22).

A 64-wide model recorded with the d12 window (100, 200) (the default of ``RunWriter`` for
``n_layer <= 12``) has no ``alpha_tail``; ``predict`` then refused the sweep with a message that said
the window exceeds the spectrum but not what to do. The message must name the fix: a narrower
``--window`` (``window=`` in Python) that fits the spectrum's size.
"""

import pytest

from spectral_lens.analysis import NoEarlyStatisticError, TailPredictor
from spectral_lens.analysis.synthetic import write_theorem6_sweep


@pytest.fixture(scope="module")
def narrow_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("narrow")
    return write_theorem6_sweep(root, tiers=(1, 2, 4), dim=64, grad_dim=32, n_measure=10, n_eval=20,
                                tail_window=(100, 200))


def test_recorded_window_too_wide_says_how_to_fix(narrow_sweep):
    with pytest.raises(NoEarlyStatisticError) as info:
        TailPredictor().fit(narrow_sweep)
    msg = str(info.value)
    assert "only 64 eigenvalues" in msg
    assert "recorded" in msg and "run.json" in msg       # where the window came from
    assert "HI <= 64" in msg and "--window 10 40" in msg and "window=(10, 40)" in msg   # what to pass
    TailPredictor(window=(10, 40)).fit(narrow_sweep)     # ... and that advice works


def test_given_window_too_wide_says_it_was_given(narrow_sweep):
    with pytest.raises(NoEarlyStatisticError) as info:
        TailPredictor(window=(10, 80)).fit(narrow_sweep)
    msg = str(info.value)
    assert "window [10, 80] exceeds the spectrum" in msg
    assert "the window you passed" in msg and "HI <= 64" in msg
    assert "run.json" not in msg


def test_collapsed_spectrum_message_is_unchanged():
    """The hint is only for a window wider than the spectrum, not for other fit failures (zeros in it)."""
    from types import SimpleNamespace

    import torch

    import spectral_lens as sl
    from spectral_lens.analysis.early import _fit_alpha

    collapsed = sl.Spectrum(torch.cat([torch.ones(5), torch.zeros(59)]).double(), kind="activation_covariance",
                             n_rows=100, dim=64)
    m = SimpleNamespace(step=3, spectra={"act:h": collapsed})
    with pytest.raises(NoEarlyStatisticError) as info:
        _fit_alpha(sl.BandAlphaFitter((10, 40)), m, "act:h", SimpleNamespace(run_id="r"))
    assert "run 'r', step 3" in str(info.value) and "HI <=" not in str(info.value)


def _steps_as_tokens_run(root, tokens_per_step):
    """A Trainer-callback record without a token count: its tokens are the optimizer steps."""
    import math

    import torch

    from spectral_lens.records import RunInfo, RunWriter
    import spectral_lens as sl

    values = torch.tensor([1.0 / j ** 1.5 for j in range(1, 65)], dtype=torch.float64)
    spec = sl.Spectrum(values, kind="activation_covariance", n_rows=256, dim=64)
    with RunWriter(root, RunInfo("hf-b8", family="f", batch_tier=8, n_layer=2, total_tokens=30 * 256),
                   tail_window=(10, 40)) as w:
        for step in range(5, 31, 5):
            w.log_measurement(step, step * tokens_per_step, {"act:h": spec}, val_loss=5.0 - math.log(step))
    return root


def test_tokens_that_are_steps_are_named_when_the_fraction_is_not_reached(tmp_path):
    from spectral_lens.analysis import FractionNotReachedError, early_alpha
    from spectral_lens.records import RunRecord

    run = RunRecord.open(_steps_as_tokens_run(tmp_path / "steps", 1))
    with pytest.raises(FractionNotReachedError) as info:
        early_alpha(run)
    msg = str(info.value)
    assert "latest measurement is at progress 0.004 < 0.2" in msg
    assert "tokens equal its steps" in msg and "tokens_per_step" in msg and "include_num_input_tokens_seen" in msg


def test_a_run_short_of_the_fraction_with_real_tokens_has_no_steps_hint(tmp_path):
    from spectral_lens.analysis import FractionNotReachedError, early_alpha
    from spectral_lens.records import RunRecord

    run = RunRecord.open(_steps_as_tokens_run(tmp_path / "tokens", 16))   # 30 * 16 of 30 * 256 tokens
    with pytest.raises(FractionNotReachedError) as info:
        early_alpha(run)
    assert "tokens equal its steps" not in str(info.value)
