"""Point labels of the early-statistic figure (``early_alpha_vs_eps.png``) do not overlap.

Labels were offset per family only: two tiers of one family whose points coincide or nearly do (same
early statistic, same eps_tok: B=64 and B=128 of a saturated sweep) were printed over each other.
:func:`spectral_lens.plot.label_offsets` places them; tested as a pure function and on the figure's
text boxes (geometry, not pixels)."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("matplotlib")

from spectral_lens import plot  # noqa: E402
from spectral_lens.analysis import TailPredictor  # noqa: E402
from spectral_lens.analysis.synthetic import write_theorem6_sweep  # noqa: E402
from spectral_lens.records import open_runs  # noqa: E402

LINE = 1.25 * 7.0


def _boxes(anchors, labels, offsets, fontsize=7.0):
    return [(x + dx, y + dy, x + dx + 0.6 * fontsize * len(t), y + dy + 1.25 * fontsize)
            for (x, y), t, (dx, dy) in zip(anchors, labels, offsets)]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_separate_points_keep_the_default_offset():
    anchors = [(10.0, 10.0), (200.0, 10.0), (10.0, 150.0)]
    assert plot.label_offsets(anchors, ["B=8", "B=16", "B=32"], height=300) == [(5.0, 3.0)] * 3


@pytest.mark.parametrize("spread", [0.0, 2.0, 6.0])
def test_coinciding_points_get_stacked_labels(spread):
    anchors = [(100.0, 100.0 + spread * i) for i in range(4)]
    labels = ["B=16", "B=32", "B=64", "B=128"]
    offsets = plot.label_offsets(anchors, labels, height=300)
    assert offsets[0] == (5.0, 3.0)  # the first keeps its place
    boxes = _boxes(anchors, labels, offsets)
    assert not any(_overlap(a, b) for a, b in itertools.combinations(boxes, 2))
    assert all(abs(dy) <= 4 * LINE + 3 for _, dy in offsets)  # near their points, not flung away


def test_stacked_labels_stay_inside_the_axes_where_they_can():
    anchors = [(50.0, 1.0), (50.0, 1.0)]  # at the bottom edge: the second goes up, not below the axes
    offsets = plot.label_offsets(anchors, ["B=4", "B=8"], height=200)
    assert offsets[1][1] == pytest.approx(3.0 + LINE)
    top = [(50.0, 190.0), (50.0, 190.0)]  # at the top edge: the second goes down
    assert plot.label_offsets(top, ["B=4", "B=8"], height=200)[1][1] == pytest.approx(3.0 - LINE)
    # a label with room at its default place keeps it, also beyond the axes' edge (annotations are not clipped)
    assert plot.label_offsets([(50.0, 199.0)], ["B=4"], height=200) == [(5.0, 3.0)]


def test_figure_labels_of_nearly_coinciding_points_do_not_overlap(tmp_path):
    """A sweep whose two largest tiers have the same q: their early alpha and eps_tok nearly coincide
    (the report CLI drew 'B=128' over 'B=64')."""
    q = {8: 0.75, 16: 0.62, 32: 0.58, 64: 0.6, 128: 0.6}
    write_theorem6_sweep(tmp_path, tuple(q), family="toy", q=q, n_measure=20, n_eval=100)
    score = TailPredictor().fit(open_runs([tmp_path])).score(targets=3.2)
    fig = plot.plot_early_vs_eps(score)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text().startswith("B=")]
    assert sorted(t.get_text() for t in texts) == sorted(f"B={b}" for b in q)
    boxes = {t.get_text(): t.get_window_extent() for t in texts}
    assert not boxes["B=64"].overlaps(boxes["B=128"])
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes.values(), 2))


def _label_offsets_cubic(anchors, labels, *, height=float("inf"), fontsize=7.0, gap=(5.0, 3.0)):
    """The first label_offsets, kept as the reference: every move of every label checked against every placed
    box (cubic in the number of labels: 1.7 s for 200 coinciding points, over two minutes for 1000)."""
    line = 1.25 * fontsize
    placed = []
    out = []
    for (x, y), text in zip(anchors, labels):
        w = 0.6 * fontsize * max(len(text), 1)
        x0 = x + gap[0]
        moves = [gap[1]] + [gap[1] + sign * k * line for k in range(1, len(placed) + 2) for sign in (-1, 1)]
        free = [dy for dy in moves if not any(x0 < bx1 and bx0 < x0 + w and y + dy < by1 - 1e-6
                                               and by0 < y + dy + line - 1e-6 for bx0, by0, bx1, by1 in placed)]
        inside = [dy for dy in free if 0.0 <= y + dy and y + dy + line <= height]
        dy = free[0] if free[0] == gap[1] else (inside or free)[0]
        placed.append((x0, y + dy, x0 + w, y + dy + line))
        out.append((gap[0], dy))
    return out


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# coordinates on coarse grids (many coinciding points, and boxes that exactly touch: with fontsize 5 a box is
# 3 pt per character wide and 6.25 pt tall, both exact) or anywhere
_coord = st.one_of(st.integers(-4, 40).map(lambda k: k * 1.5625), st.integers(-4, 40).map(float),
                   st.floats(-50, 400, allow_nan=False))
_gap = st.one_of(st.sampled_from([5.0, 3.0, 0.0, -3.0]), st.floats(-10, 10))


@settings(max_examples=400, deadline=None)
# boxes that exactly touch side by side (5 + 2 * 3.0 == 6 + 5); a stacked label exactly at the axes' bottom (0)
@example(points=[(0.0, 0.0, "ab"), (6.0, 0.0, "a"), (6.0, 0.0, "a")], height=float("inf"), fontsize=5.0, gap=(5.0, 3.0))
@example(points=[(0.0, 3.25, "a"), (0.0, 3.25, "a"), (0.0, 3.25, "a")], height=100.0, fontsize=5.0, gap=(5.0, 3.0))
@given(points=st.lists(st.tuples(_coord, _coord, st.text("B=0123456789", max_size=8)), max_size=40),
       height=st.one_of(st.just(float("inf")), st.integers(0, 60).map(lambda k: k * 3.125), st.floats(0, 300)),
       fontsize=st.sampled_from([5.0, 7.0, 5.5, 9.0, 1e-3]), gap=st.tuples(_gap, _gap))
def test_label_offsets_is_the_cubic_reference_in_quadratic_time(points, height, fontsize, gap):
    """label_offsets now finds the few moves each placed box blocks from its height (O(n^2) for n labels); the
    offsets are exactly the reference's, bit for bit."""
    anchors = [(x, y) for x, y, _ in points]
    labels = [t for _, _, t in points]
    kw = dict(height=height, fontsize=fontsize, gap=gap)
    assert plot.label_offsets(anchors, labels, **kw) == _label_offsets_cubic(anchors, labels, **kw)


def test_label_offsets_of_many_coinciding_points_match_the_reference():
    anchors = [(100.0, 100.0)] * 120 + [(100.0 + i % 7, 100.0 + 3.1 * (i % 11)) for i in range(120)]
    labels = [f"B={2 ** (i % 12)}" for i in range(240)]
    assert plot.label_offsets(anchors, labels, height=200) == _label_offsets_cubic(anchors, labels, height=200)
