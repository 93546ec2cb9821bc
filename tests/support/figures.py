"""Report figures built but not rendered, for tests about which files a report writes."""
from __future__ import annotations

import pytest


def save_figures_unrendered(monkeypatch) -> None:
    """Every figure is still built (each ``plot_*`` call runs, so one that cannot be drawn is still a
    note) and saved through the real ``save_figure`` (atomic, a real PNG), but as an empty figure:
    rendering is most of a report's time (~0.25 s a figure). ``monkeypatch``: pytest's fixture or one of
    its ``context()``s. The rendered figures are checked in tests/analysis/test_report_real_records.py
    (each PNG > 5 kB) and by the smoke jobs."""
    Figure = pytest.importorskip("matplotlib.figure").Figure
    from spectral_lens import plot

    real = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, path, **kw: real(Figure(figsize=(0.5, 0.5)), path, **kw))
