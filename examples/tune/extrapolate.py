"""Power-law extrapolation of a loss curve, recorded by the tuner as a diagnostic only (App. B.3).

The paper extrapolates each candidate's validation curve to a longer budget (500M -> 1B tokens) and
never lets the extrapolation drive promotion. We fit ``L(b) = a + k * b**(-c)`` by least squares
(``scipy.optimize.curve_fit``); when that fit fails or is not defined (fewer than four points, a
non-converging fit, a non-finite prediction) we fall back to a straight line in log-log,
``log L = log k - c log b``, which needs two points.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Extrapolation", "extrapolate_loss"]


@dataclass(frozen=True)
class Extrapolation:
    """A predicted loss at ``budget``: ``loss`` (NaN when nothing could be fitted) and the ``model`` used.

    ``model`` is ``"saturating"`` (``a + k b^-c``), ``"loglog"`` (``k b^-c``) or ``"none"``;
    ``params`` holds the fitted ``(a, k, c)`` (``a = 0`` for the log-log line).
    """

    budget: float
    loss: float
    model: str
    params: tuple[float, ...] = ()


def extrapolate_loss(resources: Sequence[float], losses: Sequence[float], budget: float) -> Extrapolation:
    """Fit the curve ``(resources, losses)`` and predict the loss at ``budget``.

    Points with a non-positive resource or a non-finite/non-positive loss are ignored (step 0 and
    diverged evaluations carry no power-law information).
    """
    b = np.asarray(resources, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if b.shape != y.shape or b.ndim != 1:
        raise ValueError(f"extrapolate_loss: resources {b.shape} and losses {y.shape} must be 1-D of one length")
    keep = (b > 0) & np.isfinite(y) & (y > 0)
    b, y = b[keep], y[keep]
    if len(np.unique(b)) >= 4:
        from scipy.optimize import curve_fit

        scale = b.max()
        x = b / scale  # fit in units of the largest budget: well conditioned exponents

        def model(x, a, k, c):
            return a + k * np.power(x, -c)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, _ = curve_fit(model, x, y, p0=(0.5 * y.min(), 0.5 * y.min(), 0.5),
                                 bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 10.0]), maxfev=5000)
            pred = float(model(budget / scale, *p))
            if math.isfinite(pred):
                a, k, c = (float(v) for v in p)
                return Extrapolation(budget, pred, "saturating", (a, k * scale ** c, c))
        except (RuntimeError, ValueError):
            pass
    if len(np.unique(b)) >= 2:
        slope, intercept = np.polyfit(np.log(b), np.log(y), 1)
        pred = float(np.exp(intercept + slope * math.log(budget)))
        if math.isfinite(pred):
            return Extrapolation(budget, pred, "loglog", (0.0, float(np.exp(intercept)), float(-slope)))
    return Extrapolation(budget, float("nan"), "none")
