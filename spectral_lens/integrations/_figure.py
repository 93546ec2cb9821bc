"""A spectrum as a small log-log figure, rendered to an RGB array without pyplot."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..spectrum import Spectrum


def spectrum_image(spectrum: Spectrum, title: str, tail=None, head=None) -> np.ndarray:
    """(H, W, 3) uint8 image of the trace-normalized spectrum against rank, windows shaded.

    Needs matplotlib (extra ``plot``); nothing touches pyplot or the user's backend.
    """
    from ..plot import require_matplotlib

    Figure = require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    values = np.asarray(spectrum.values, dtype=np.float64)
    total = values.sum()
    fig = Figure(figsize=(4.0, 3.0), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ranks = np.arange(1, values.size + 1)
    keep = values > 0
    if total > 0 and keep.any():
        ax.loglog(ranks[keep], values[keep] / total, lw=1.2)
    for window, color in ((tail, "tab:red"), (head, "tab:green")):
        if window is not None and window[0] <= values.size:
            ax.axvspan(window[0], min(window[1], values.size), color=color, alpha=0.15)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue / trace")
    ax.set_title(title, fontsize=8)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def measurement_images(measurement, tail=None, head=None, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """``(tag, image)`` for each spectrum of ``measurement``: ``<prefix><spectrum>/spectrum`` and its
    :func:`spectrum_image` titled ``<spectrum> @ step <step>``, the figures every sink logs alike."""
    step = int(measurement.step)
    for name, spectrum in measurement.spectra.items():
        yield f"{prefix}{name}/spectrum", spectrum_image(spectrum, f"{name} @ step {step}", tail, head)
