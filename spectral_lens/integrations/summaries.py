"""The scalars a logging sink shows for one :class:`~spectral_lens.lens.LensMeasurement`.

One small helper so every sink logs the same names. A measurement of
:class:`~spectral_lens.SpectralLens` carries its summaries (``LensMeasurement.summaries``, computed
with the run record's windows by :func:`spectral_lens.records.spectrum_summaries`, the function that
also fills ``measurements.jsonl``), so the logged values equal the recorded ones; for a spectrum
without stored summaries (a measurement built by hand) they are computed here with the same function.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..lens import LensMeasurement
from ..records import spectrum_summaries

__all__ = ["SUMMARY_KEYS", "measurement_summaries", "measurement_scalars"]

#: Per-spectrum summaries every sink logs (``NaN`` when a window does not fit the spectrum).
SUMMARY_KEYS = ("alpha_tail", "alpha_head", "rankme", "stable_rank")


def measurement_summaries(
    measurement: LensMeasurement,
    tail: tuple[int, int] | None = (100, 200),
    head: tuple[int, int] | None = (10, 40),
) -> dict[str, dict[str, float]]:
    """Per spectrum name, its :data:`SUMMARY_KEYS` values.

    Args:
        measurement: one measurement of :class:`~spectral_lens.SpectralLens`.
        tail, head: rank windows of ``alpha_tail`` and ``alpha_head`` for spectra whose summaries
            the measurement does not carry (its own summaries use the lens's windows).

    A key whose value :func:`~spectral_lens.records.spectrum_summaries` leaves out (a window outside
    the spectrum or beyond the sample rank, an all-zero spectrum) is ``NaN``, so a chart shows a gap
    instead of silently dropping the series.
    """
    out: dict[str, dict[str, float]] = {}
    for name, spectrum in measurement.spectra.items():
        summ = measurement.summaries.get(name)
        if summ is None:
            summ = spectrum_summaries(spectrum, tail, head)
        out[name] = {key: float(summ.get(key, math.nan)) for key in SUMMARY_KEYS}
    return out


def measurement_scalars(
    measurement: LensMeasurement,
    tail: tuple[int, int] | None = (100, 200),
    head: tuple[int, int] | None = (10, 40),
    prefix: str = "spectral_lens/",
) -> dict[str, float]:
    """Flat ``{tag: value}`` of one measurement: ``<prefix><spectrum>/<summary>`` per spectrum and
    ``<prefix><scalar>`` per measurement scalar (``noise_scale``, ``noise_scale:<param>``,
    ``val_loss``).

    Values are Python floats and may be ``NaN`` or ``inf`` (a zero mean gradient gives an infinite
    noise scale): sinks log them as such.
    """
    flat: dict[str, float] = {}
    for name, summ in measurement_summaries(measurement, tail, head).items():
        for key, value in summ.items():
            flat[f"{prefix}{name}/{key}"] = value
    scalars: Mapping[str, float] = measurement.scalars
    for key, value in scalars.items():
        flat[f"{prefix}{key}"] = float(value)
    return flat
