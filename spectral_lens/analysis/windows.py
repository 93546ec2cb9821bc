"""Which spectrum and which rank window an analysis of a run uses.

The window of ``alpha_tail`` is the one each run recorded (``summary_windows["tail"]`` in its
``run.json``, written by :class:`~spectral_lens.records.RunWriter`) unless the caller passes one.
Runs compared with each other (the tiers of one family) must use the same window:
:func:`common_windows` checks that and names the runs that disagree.
"""

from __future__ import annotations

import warnings
from typing import Iterable

from .._warnings import SpectralLensWarning
from ..records import RunRecord
from ..spectra.fit import tail_window, window_ranks
from .efficiency import NO_FAMILY

__all__ = ["DEFAULT_WINDOW", "WindowMismatchError", "SpectrumMismatchError", "resolve_spectrum", "resolve_window",
           "common_windows", "common_spectra"]

#: The d12 tail window, used when neither a window, a recorded window nor ``RunInfo.n_layer`` is known.
DEFAULT_WINDOW = (100, 200)


class WindowMismatchError(ValueError):
    """Runs that are compared with each other recorded different tail windows."""


class SpectrumMismatchError(ValueError):
    """Runs that are compared with each other would be analysed on different spectra (layers)."""


def resolve_spectrum(run: RunRecord, spectrum: str | None = None) -> str:
    """The spectrum name an analysis of ``run`` uses.

    Order: ``spectrum`` if given (must exist in the run); else ``run.info.primary_spectrum``; else
    the run's only activation-covariance spectrum. Several candidates and no choice is an error
    that lists them (pass ``spectrum=`` or record ``primary_spectrum``; the paper's convention is
    the deepest activation probe).
    """
    names = run.spectrum_names()
    if spectrum is not None:
        if spectrum not in names:
            raise ValueError(f"run {run.run_id!r}: no spectrum named {spectrum!r}; available: {names}")
        return spectrum
    if run.info.primary_spectrum is not None:
        if run.info.primary_spectrum not in names:
            raise ValueError(
                f"run {run.run_id!r}: primary_spectrum {run.info.primary_spectrum!r} never measured; available: {names}"
            )
        return run.info.primary_spectrum
    acts = run.spectrum_names("activation_covariance")
    if len(acts) == 1:
        return acts[0]
    if not acts:
        raise ValueError(f"run {run.run_id!r}: no activation-covariance spectrum recorded (spectra: {names})")
    raise ValueError(
        f"run {run.run_id!r}: several activation spectra {acts}; pass spectrum=NAME (spectral-lens "
        "predict/report: --spectrum NAME; the paper uses the deepest layer) or record RunInfo.primary_spectrum"
    )


def resolve_window(run: RunRecord, window: tuple[int, int] | None = None) -> tuple[int, int]:
    """The tail window for ``run``, in this order: ``window`` if given; the window the run recorded
    (``run.summary_windows["tail"]``, from ``run.json``); the scale rule for ``info.n_layer``
    (:func:`spectral_lens.tail_window`); else the d12 window ``(100, 200)`` with a warning. A given
    ``window`` that is not a pair of integer ranks ``1 <= lo < hi`` (a float, even ``100.0``, or fractions
    such as ``(0.1, 0.2)``; a bool) raises ``ValueError`` naming it; a recorded
    window that is not 1-based ranks ``lo < hi``, or an ``n_layer`` below 1 (no recorded window), raises
    ``ValueError`` naming the run and its run.json."""
    if window is not None:  # checked as BandAlphaFitter does: int() made (0.1, 0.2) (0, 0) and (100.7, 200) (100, 200)
        return window_ranks(window, "window")
    recorded = (getattr(run, "summary_windows", None) or {}).get("tail")
    if recorded:
        lo, hi = (int(recorded[0]), int(recorded[1]))
        if not 1 <= lo < hi:  # the reader checks types only (inspect shows such a run.json); name the run here
            where = f"{run.path / 'run.json'}" if getattr(run, "path", None) is not None else "its run.json"
            raise ValueError(f"run {run.run_id!r}: {where} records tail window {[lo, hi]}, not 1-based ranks "
                             "LO < HI; pass window=(LO, HI) (CLI: --window LO HI)")
        return (lo, hi)
    if run.info.n_layer:
        try:
            return tail_window(int(run.info.n_layer))
        except ValueError as exc:  # an n_layer < 1 of a hand-written run.json: name the run and its file
            where = f"{run.path / 'run.json'}" if getattr(run, "path", None) is not None else "its RunInfo"
            raise ValueError(f"run {run.run_id!r}: {where}: {exc} (a depth, for the scale rule's tail window); "
                             "pass window=(LO, HI) (CLI: --window LO HI)") from None
    warnings.warn(  # the default warning filter shows each run's message once
        f"run {run.run_id!r}: no recorded tail window and RunInfo.n_layer unknown; using the d12 tail window "
        f"{DEFAULT_WINDOW} (pass window= to choose)",
        SpectralLensWarning,
        stacklevel=3,
    )
    return DEFAULT_WINDOW


def common_windows(runs: Iterable[RunRecord], window: tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
    """Family -> the one tail window its runs are compared on.

    With ``window`` given, every family uses it. Otherwise each run's window comes from
    :func:`resolve_window` (its recorded window first), and all runs of a family must agree: the
    tiers of a family are ranked against each other, so their ``alpha_tail`` must be fitted on the
    same ranks. Families may differ (the paper's scale rule gives deeper models wider windows; the
    pooled score min-max normalizes each family). Disagreement raises :class:`WindowMismatchError`
    naming the runs and their windows.
    """
    by_family: dict[str, dict[tuple[int, int], list[str]]] = {}
    for run in runs:
        family = run.info.family if run.info.family is not None else NO_FAMILY
        win = resolve_window(run, window)
        by_family.setdefault(family, {}).setdefault(win, []).append(run.run_id)
    out = {}
    for family, wins in by_family.items():
        if len(wins) > 1:
            parts = "; ".join(
                f"{', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}: {list(w)}" for w, ids in sorted(wins.items())
            )
            where = "" if family == NO_FAMILY else f" of family {family!r}"
            raise WindowMismatchError(
                f"runs{where} recorded different tail windows ({parts}); ranking them needs one window: "
                "pass window=(LO, HI) (CLI: --window LO HI)"
            )
        out[family] = next(iter(wins))
    return out


def common_spectra(runs: Iterable[RunRecord], spectrum: str | None = None) -> dict[str, str]:
    """Family -> the one spectrum (layer) its runs are compared on.

    Each run's spectrum is :func:`resolve_spectrum` (``spectrum`` if given, else its
    ``primary_spectrum`` or only activation spectrum). The tiers of a family are ranked against each
    other, so they must be measured at the same layer: runs that resolve to different names raise
    :class:`SpectrumMismatchError` naming the runs and their spectra (``alpha_tail`` of different
    layers differs by more than the tiers do). Runs whose spectrum cannot be resolved yet (no
    measurement) are left to the analysis itself.
    """
    by_family: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        if not run.measurements:
            continue
        family = run.info.family if run.info.family is not None else NO_FAMILY
        by_family.setdefault(family, {}).setdefault(resolve_spectrum(run, spectrum), []).append(run.run_id)
    out = {}
    for family, names in by_family.items():
        if len(names) > 1:
            parts = "; ".join(f"{', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}: {name!r}"
                              for name, ids in names.items())
            where = "" if family == NO_FAMILY else f" of family {family!r}"
            raise SpectrumMismatchError(
                f"runs{where} would be compared on different spectra ({parts}); ranking tiers needs the same "
                "layer in every run: record the same primary_spectrum, pass spectrum=NAME (CLI: --spectrum NAME) "
                "if every run measured it, or leave the odd runs out"
            )
        out[family] = next(iter(names))
    return out
