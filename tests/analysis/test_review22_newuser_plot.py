"""The report's alpha_tail figure for a sweep whose recorded tail window is wider than the spectrum
(review 22): every checkpoint is unfittable, and the panel must say why and what to pass, not
"not fittable at some checkpoints"."""

import pytest

pytest.importorskip("matplotlib")

from spectral_lens.analysis.synthetic import write_theorem6_sweep  # noqa: E402
from spectral_lens.plot import plot_alpha_trajectories  # noqa: E402
from spectral_lens.records import open_runs  # noqa: E402


def _panel_text(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_window_wider_than_spectrum_is_named_in_the_panel(tmp_path):
    runs = open_runs(write_theorem6_sweep(tmp_path, tiers=(1, 2), dim=64, grad_dim=32, n_measure=6, n_eval=6,
                                          tail_window=(100, 200)))
    text = _panel_text(plot_alpha_trajectories(runs))
    assert "some checkpoints" not in text
    assert "[100, 200]" in text and "64 eigenvalues" in text and "--window" in text and "HI <= 64" in text


def test_window_that_fits_has_no_note(tmp_path):
    runs = open_runs(write_theorem6_sweep(tmp_path, tiers=(1, 2), dim=64, grad_dim=32, n_measure=6, n_eval=6,
                                          tail_window=(10, 40)))
    assert _panel_text(plot_alpha_trajectories(runs)) == ""
