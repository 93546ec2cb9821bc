"""measurement_summaries / measurement_scalars: the scalars every sink logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spectral_lens as sl
from spectral_lens.integrations import measurement_scalars, measurement_summaries
from spectral_lens.records import spectrum_summaries


def power_law(d: int, alpha: float) -> sl.Spectrum:
    r = np.arange(1, d + 1, dtype=np.float64)
    return sl.Spectrum(torch.from_numpy(r**-alpha), n_rows=10 * d, dim=d, source="x")


def measurement(spectra, scalars):
    return sl.LensMeasurement(step=7, tokens=70, spectra=spectra, scalars=scalars)


def test_summaries_equal_the_records_and_the_known_exponent():
    m = measurement({"act:a": power_law(300, 1.3), "act:b": power_law(64, 0.7)}, {"noise_scale": 12.5})
    summ = measurement_summaries(m, (100, 200), (10, 40))
    assert set(summ) == {"act:a", "act:b"}
    ref = spectrum_summaries(m.spectra["act:a"], (100, 200), (10, 40))
    for key in ("alpha_tail", "alpha_head", "rankme", "stable_rank"):
        assert summ["act:a"][key] == ref[key]
    # an exact power law: both band fits recover its exponent
    assert summ["act:a"]["alpha_tail"] == pytest.approx(1.3, abs=1e-9)
    assert summ["act:a"]["alpha_head"] == pytest.approx(1.3, abs=1e-9)
    assert summ["act:b"]["alpha_head"] == pytest.approx(0.7, abs=1e-9)
    # RankMe from its definition (entropy of the normalized spectrum), in float64
    p = np.arange(1, 301, dtype=np.float64) ** -1.3
    p /= p.sum()
    assert summ["act:a"]["rankme"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_a_window_the_spectrum_cannot_resolve_is_nan_not_missing():
    m = measurement({"act:b": power_law(64, 0.7)}, {})
    summ = measurement_summaries(m, (100, 200), (10, 40))["act:b"]
    assert math.isnan(summ["alpha_tail"])
    assert math.isfinite(summ["alpha_head"])


def test_scalars_are_flat_prefixed_and_keep_non_finite_values():
    m = measurement({"act:a": power_law(50, 1.0)}, {"noise_scale": math.inf, "val_loss": math.nan})
    flat = measurement_scalars(m, (10, 40), None, prefix="p/")
    assert flat["p/noise_scale"] == math.inf
    assert math.isnan(flat["p/val_loss"])
    assert math.isnan(flat["p/act:a/alpha_head"])  # head=None: no window
    assert flat["p/act:a/alpha_tail"] == pytest.approx(1.0, abs=1e-9)
    assert set(flat) == {"p/noise_scale", "p/val_loss"} | {f"p/act:a/{k}" for k in
                                                          ("alpha_tail", "alpha_head", "rankme", "stable_rank")}


def test_summaries_the_measurement_carries_are_used_as_they_are():
    m = sl.LensMeasurement(1, 1, {"act:a": power_law(64, 1.0)}, {"noise_scale": 2.0},
                           summaries={"act:a": {"alpha_tail": 0.25, "rankme": 3.0}})
    flat = measurement_scalars(m, (10, 40), (1, 4))
    assert flat["spectral_lens/act:a/alpha_tail"] == 0.25 and flat["spectral_lens/act:a/rankme"] == 3.0
    assert math.isnan(flat["spectral_lens/act:a/stable_rank"])  # not carried: NaN, not recomputed


def test_a_lens_measurement_logs_what_it_records(tmp_path):
    from support.models import TinyGPT, lm_pool

    from spectral_lens.records import RunInfo, RunWriter, open_runs

    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False, tail_window=(3, 12), head_window=(1, 3)) as w:
        m = sl.SpectralLens(model, lm_pool(2, batch=4, t=12, vocab=37), writer=w).measure(1, 10)
    flat = measurement_scalars(m)
    stored = open_runs([tmp_path / "r"])[0].measurements[0].summaries
    assert set(stored) == {"act:transformer.h.1", "grad:transformer.h.1.attn.c_proj.weight"}
    assert "alpha_tail" in stored["act:transformer.h.1"]
    for name, summ in stored.items():
        for key in ("alpha_tail", "alpha_head", "rankme", "stable_rank"):
            if key in summ:
                assert flat[f"spectral_lens/{name}/{key}"] == pytest.approx(summ[key], rel=1e-12)
            else:  # a window 8 gradient samples cannot resolve: not stored, logged as NaN
                assert math.isnan(flat[f"spectral_lens/{name}/{key}"])
