"""The report's early-statistic vs eps_tok scatter (review 22): the "target not reached" note sat at
the top-left corner, exactly where a run that never reached the target lands when it has the family's
smallest statistic (normalized 0, drawn as a triangle at the top), so the note covered that point and
its tier label (seen on a 3-tier GPT-2 sweep whose flattest tier ended above the target)."""

import math

import pytest

pytest.importorskip("matplotlib")

from spectral_lens.analysis.tier_predictor import FamilyScore, PredictionScore  # noqa: E402
from spectral_lens.plot import plot_early_vs_eps  # noqa: E402

POINTS = (("b4", "f", 4, 1.0, 1.0), ("b8", "f", 8, 0.59, 1.5), ("b16", "f", 16, 0.0, math.inf))


def _score():
    return PredictionScore("alpha_tail", -1.0, 1 / 3, 3, {"f": FamilyScore(-1.0, 1 / 3, 3)}, -1.0, POINTS)


def test_the_not_reached_note_covers_no_point_and_no_label():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_early_vs_eps(_score())
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.axes[0]
    notes = [t for t in [*ax.texts, ax.title] if "not reached" in t.get_text()]
    assert notes, "the figure must still say what the triangle means"
    labels = [t for t in ax.texts if t.get_text().startswith("B=")]
    assert sorted(t.get_text() for t in labels) == ["B=16", "B=4", "B=8"]
    markers = [xy for c in ax.collections for xy in ax.transData.transform(c.get_offsets())]
    assert len(markers) == 3
    for note in notes:
        box = note.get_window_extent(renderer)
        for x, y in markers:
            assert not box.expanded(1.0, 1.0).contains(x, y), f"the note {note.get_text()!r} covers a point"
        for label in labels:
            assert not box.overlaps(label.get_window_extent(renderer)), f"the note covers {label.get_text()}"
