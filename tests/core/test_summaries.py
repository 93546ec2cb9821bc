"""Spectrum file format, band alpha, crossover estimate and effective ranks vs float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_lens import (
    PAPER_WINDOWS,
    ActivationCovarianceAccumulator,
    BandAlphaFitter,
    InsufficientRowsWarning,
    RankMe,
    Spectrum,
    SpectrumFormatError,
    crossover_rank,
    participation_ratio,
    stable_rank,
    tail_window,
)
from spectral_lens.spectra import band_alpha, estimate_crossover

from support.data import exact_covariance_rows, theorem6_spectrum


def _spectrum(values, n_rows=10**6, kind="activation_covariance"):
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1].copy()
    return Spectrum(torch.from_numpy(v), n_rows=n_rows, dim=v.size, kind=kind, source="test")


@settings(max_examples=50, deadline=None)
@given(
    alpha=st.floats(0.2, 3.0),
    lo=st.integers(1, 300),
    width=st.integers(3, 400),
    noise=st.floats(0, 0.2),
    seed=st.integers(0, 2**31 - 1),
)
def test_band_alpha_matches_numpy_least_squares(alpha, lo, width, noise, seed):
    rng = np.random.default_rng(seed)
    r = np.arange(1, 800, dtype=np.float64)
    values = r**-alpha * np.exp(noise * rng.standard_normal(r.size))
    values = np.sort(values)[::-1]
    p = values / values.sum()
    hi = min(lo + width, p.size)
    fit = band_alpha(p, (lo, hi))
    x, y = np.log(np.arange(lo, hi + 1.0)), np.log(p[lo - 1 : hi])
    (slope, icpt), res, *_ = np.polyfit(x, y, 1, full=True)
    assert fit.alpha == pytest.approx(-slope, rel=1e-9, abs=1e-12)
    assert fit.intercept == pytest.approx(icpt, rel=1e-9, abs=1e-9)
    assert fit.n_points == hi - lo + 1
    sse = float(res[0]) if res.size else 0.0
    sst = float(((y - y.mean()) ** 2).sum())
    assert fit.r2 == pytest.approx(1 - sse / sst if sst > 0 else 1.0, abs=1e-9)
    se = np.sqrt(sse / (x.size - 2) / ((x - x.mean()) ** 2).sum())
    assert fit.stderr == pytest.approx(se, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("p,q,eta_t", [(1.0, 1.0, 2.0), (1.2, 0.5, 0.2), (0.8, 1.5, 30.0), (1.5, 2.0, 250.0)])
def test_theorem6_tail_alpha_is_p_plus_2q(p, q, eta_t):
    """Analytic three-zone spectra (learned head, bend at r*, unresolved tail): alpha_tail = p + 2q within 1%.

    The local exponent is ``p + 2q - q x + O(x^2)`` with ``x = eta t r^-q``, so the asymptotic law holds
    where ``x << 1`` across the window; the parameters put ``x <= 0.03`` at rank 100.
    """
    values = theorem6_spectrum(768, p, q, eta_t)
    spectrum = _spectrum(values)
    r_star = eta_t ** (1 / q)
    assert eta_t * 100.0**-q <= 0.03  # the [100, 200] tail window is past the bend
    fit = BandAlphaFitter.tail(n_layer=12).fit(spectrum)
    assert fit.window == (100, 200)
    assert fit.alpha == pytest.approx(p + 2 * q, rel=0.01)
    # the head window sees the learned exponent p, not the tail
    est = crossover_rank(spectrum)
    assert est.rank == pytest.approx(r_star, rel=1e-3)
    assert est.head_alpha == pytest.approx(p, rel=1e-3)
    assert est.tail_alpha == pytest.approx(p + 2 * q, rel=1e-3)


def test_theorem6_through_the_accumulator():
    """Rows whose sample covariance has a Theorem-6 spectrum: accumulate in fp32 chunks, recover p + 2q."""
    rng = np.random.default_rng(7)
    values = theorem6_spectrum(256, 1.0, 1.0, 4.0)
    rows = exact_covariance_rows(values, 4000, rng, mean_scale=100.0)
    acc = ActivationCovarianceAccumulator(precision="exact")
    for chunk in torch.from_numpy(rows).float().split(512):
        acc.update(chunk)
    fit = BandAlphaFitter((100, 200)).fit(acc.compute())
    assert fit.alpha == pytest.approx(3.0, rel=0.01)
    assert crossover_rank(acc.compute()).rank == pytest.approx(4.0, rel=0.05)


def test_crossover_on_noisy_spectrum_and_broken_stick():
    rng = np.random.default_rng(0)
    values = theorem6_spectrum(1024, 1.0, 1.0, 30.0) * np.exp(0.05 * rng.standard_normal(1024))
    est = estimate_crossover(np.sort(values)[::-1])
    assert est.rank == pytest.approx(30.0, rel=0.15)
    assert est.tail_alpha == pytest.approx(3.0, rel=0.05)
    stick = estimate_crossover(values, method="broken_stick")
    assert 5 < stick.rank < 200 and stick.improvement > 0.5
    pure = np.arange(1, 500.0) ** -1.3
    assert estimate_crossover(pure, method="broken_stick").improvement < 1e-6 + 1e-3  # no bend, no evidence


def test_fitter_bank_windows_and_errors():
    spectrum = _spectrum(np.arange(1, 1001.0) ** -1.1)
    fits = BandAlphaFitter().fit(spectrum)
    assert [f.window for f in fits] == list(PAPER_WINDOWS)
    assert all(f.alpha == pytest.approx(1.1, rel=1e-9) for f in fits)
    with pytest.raises(ValueError, match=r"window \[400, 800\] exceeds the spectrum: only 768"):
        BandAlphaFitter.tail(48).fit(_spectrum(np.arange(1, 769.0) ** -1.0))
    zeros = np.concatenate([np.arange(1, 151.0) ** -1.0, np.zeros(100)])
    with pytest.raises(ValueError, match=r"reaches zero eigenvalues: only 150 are nonzero"):
        BandAlphaFitter((100, 200)).fit(_spectrum(zeros))
    with pytest.raises(ValueError, match="1 <= lo < hi"):
        band_alpha(np.ones(10), (5, 5))
    with pytest.warns(InsufficientRowsWarning, match="n_rows=150"):
        BandAlphaFitter((100, 200)).fit(_spectrum(np.arange(1, 301.0) ** -1.0, n_rows=150))


def test_tail_window_scale_rule():
    assert tail_window(12) == (100, 200)
    assert tail_window(6) == (100, 200)
    assert tail_window(36) == (200, 400)
    assert tail_window(48) == (400, 800)
    assert tail_window(64) == (800, 1600)
    with pytest.raises(ValueError):
        tail_window(0)


def test_ranks_against_numpy():
    rng = np.random.default_rng(1)
    lam = np.sort(rng.exponential(size=50) ** 3)[::-1]
    lam[-5:] = 0.0
    p = lam / lam.sum()
    nz = p[p > 0]
    spectrum = _spectrum(lam)
    assert RankMe()(spectrum) == pytest.approx(np.exp(-(nz * np.log(nz)).sum()), rel=1e-12)
    s = np.sqrt(lam)
    ps = s[s > 0] / s.sum()
    assert RankMe(on="singular_values")(spectrum) == pytest.approx(np.exp(-(ps * np.log(ps)).sum()), rel=1e-12)
    assert participation_ratio(spectrum) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-12)
    assert stable_rank(spectrum) == pytest.approx(lam.sum() / lam.max(), rel=1e-12)
    assert RankMe()(_spectrum(np.ones(7))) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="on must be"):
        RankMe(on="values")


def test_spectrum_roundtrip_and_corruption(tmp_path):
    spectrum = Spectrum(torch.tensor([3.0, 2.0, 0.5]), n_rows=10, dim=3, kind="gradient", source="h.11",
                        metadata={"step": 100, "tokens": 5e6})
    path = spectrum.save(tmp_path / "s.npz")
    back = Spectrum.load(path)
    assert torch.equal(back.values, spectrum.values)
    assert (back.n_rows, back.dim, back.kind, back.source, back.metadata) == (10, 3, "gradient", "h.11", spectrum.metadata)
    assert torch.allclose(back.singular_values, spectrum.values.sqrt())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SpectrumFormatError, match="bad.npz"):
        Spectrum.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, values=np.ones(3), header=np.array('{"format": "x"}'))
    with pytest.raises(SpectrumFormatError, match="not a spectral-lens spectrum header"):
        Spectrum.load(other)
    with pytest.raises(ValueError, match="descending"):
        Spectrum(torch.tensor([1.0, 2.0]), n_rows=3, dim=2)
    with pytest.raises(ValueError, match="kind"):
        Spectrum(torch.tensor([1.0]), n_rows=3, dim=1, kind="hessian")


@pytest.mark.parametrize("scale", [1e-170, 1e-160, 1.0, 1e160, 1e300])
def test_participation_ratio_and_stable_rank_are_scale_free(scale):
    """Formed from lambda / max lambda: squares of 1e160 overflowed and of 1e-170 underflowed to NaN."""
    lam = np.arange(1, 65, dtype=np.float64) ** -1.1
    ref_pr, ref_sr = lam.sum() ** 2 / (lam**2).sum(), lam.sum() / lam.max()
    values = torch.from_numpy(lam * scale)
    assert participation_ratio(values) == pytest.approx(ref_pr, rel=1e-13)
    assert stable_rank(values) == pytest.approx(ref_sr, rel=1e-13)


@pytest.mark.parametrize("fn", [participation_ratio, stable_rank], ids=lambda f: f.__name__)
def test_ranks_of_zero_and_non_finite_spectra(fn):
    """An all-zero spectrum (a zero-initialized weight, a dead layer) has rank 0 (it gave NaN); NaN/Inf
    eigenvalues are a clear error (they gave NaN)."""
    assert fn(torch.zeros(8, dtype=torch.float64)) == 0.0
    assert fn(torch.zeros(0, dtype=torch.float64)) == 0.0
    with pytest.raises(ValueError, match=f"{fn.__name__}: the spectrum has NaN/Inf eigenvalues"):
        fn(torch.tensor([3.0, float("nan"), 1.0]))


def test_crossover_improvement_stays_in_its_documented_range():
    """[0, 1]: a flat spectrum (the line fits to round-off) gave -2.2e17, and pure power laws with
    multiplicative noise gave small negative values when the bend fit ended worse than the line."""
    flat = estimate_crossover(np.ones(100))
    assert flat.improvement == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        lam = np.sort(np.arange(1, 769.0) ** -rng.uniform(0.5, 2) * np.exp(rng.normal(0, 0.05, 768)))[::-1].copy()
        assert 0.0 <= estimate_crossover(lam).improvement <= 1.0
    bent = estimate_crossover(theorem6_spectrum(768, 1.0, 1.5, 1e3))
    assert bent.improvement > 0.9  # a clean two-regime spectrum still scores near 1


@pytest.mark.parametrize("on", ["eigenvalues", "singular_values"])
def test_rankme_refuses_non_finite_and_is_scale_free(on):
    """Like participation_ratio and stable_rank: NaN/Inf eigenvalues are a clear error (NaN was
    reported as 'spectrum is all zero', an Inf gave RankMe 1.0), and huge eigenvalues do not
    overflow the trace (two equal eigenvalues of 1e308 gave 1.0 instead of 2.0)."""
    with pytest.raises(ValueError, match="rankme: the spectrum has NaN/Inf eigenvalues"):
        RankMe(on=on)(torch.tensor([3.0, float("nan"), 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="rankme: the spectrum has NaN/Inf eigenvalues"):
        RankMe(on=on)(torch.tensor([float("inf"), 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="all zero"):
        RankMe(on=on)(torch.zeros(4, dtype=torch.float64))
    lam = np.arange(1, 65, dtype=np.float64) ** -1.1
    w = np.sqrt(lam) if on == "singular_values" else lam
    p = w / w.sum()
    ref = np.exp(-(p * np.log(p)).sum())
    for scale in (1e-300, 1.0, 1e300):
        assert RankMe(on=on)(torch.from_numpy(lam * scale)) == pytest.approx(ref, rel=1e-13)
    assert RankMe(on=on)(torch.tensor([1e308, 1e308], dtype=torch.float64)) == pytest.approx(2.0, rel=1e-15)


def test_fitter_takes_numpy_integer_windows_and_refuses_fractional_ranks():
    """A window of NumPy integers (from np.argmax, np.searchsorted, ...) is one window, as a tuple of
    ints is (it raised TypeError "'numpy.int64' object is not iterable"); a fractional rank is a
    clear ValueError (it raised that TypeError, and band_alpha truncated 100.5 to 100)."""
    spectrum = _spectrum(np.arange(1, 1001.0) ** -1.1)
    fit = BandAlphaFitter((np.int64(100), np.int64(200))).fit(spectrum)
    assert fit.window == (100, 200) and fit.alpha == pytest.approx(1.1, rel=1e-9)
    assert BandAlphaFitter(np.array([100, 200])).fit(spectrum).window == (100, 200)
    with pytest.raises(ValueError, match=r"ranks must be integers"):
        BandAlphaFitter((100.5, 200)).fit(spectrum)
    with pytest.raises(ValueError, match=r"ranks must be integers"):
        band_alpha(spectrum.normalized, (100.5, 200))
    with pytest.raises(ValueError, match=r"BandAlphaFitter: windows must be one \(lo, hi\) pair"):
        BandAlphaFitter((100, 200, 400))


def test_bad_windows_and_a_matrix_spectrum_are_refused_naming_the_argument():
    """band_alpha took a window (True, 3) as ranks 1..3 and (1.0, 3.0) as integers, a 2-D spectrum
    failed with a NumPy broadcast error, and BandAlphaFitter("ab") or ((1, 3), (2.5, 4)) was refused
    only at fit(). Now a ValueError naming the argument, at construction for the fitter; lists,
    arrays and NumPy integers stay valid."""
    p = np.arange(1, 11.0) ** -1.0
    for bad in ((True, 3), (1, np.True_), (1.0, 3.0), (3, 3), (0, 3), "ab", (1, 2, 3)):
        with pytest.raises(ValueError, match=r"^window "):
            band_alpha(p, bad)
        with pytest.raises(ValueError, match=r"^ranks "):
            estimate_crossover(np.arange(1, 31.0) ** -1.0, ranks=bad)
    with pytest.raises(ValueError, match=r"p must be a 1-D array of eigenvalues .* shape \(2, 10\)"):
        band_alpha(np.stack([p, p]), (1, 3))
    with pytest.raises(ValueError, match=r"p must be a 1-D array .* shape \(\)"):
        band_alpha(torch.tensor(1.0), (1, 3))
    for bad, msg in (("ab", r"BandAlphaFitter: windows must be one \(lo, hi\) pair"),
                     ((True, 3), r"BandAlphaFitter: windows \(True, 3\): ranks must be integers"),
                     (((1, 3), (2.5, 4)), r"BandAlphaFitter: windows\[1\] \(2.5, 4\): ranks must be integers"),
                     (((1, 3), (4, 4)), r"BandAlphaFitter: windows\[1\] \(4, 4\): need 1 <= lo < hi")):
        with pytest.raises(ValueError, match=msg):
            BandAlphaFitter(bad)  # no spectrum needed: refused when built
    for good in ([1, 3], np.array([1, 3]), (np.int32(1), np.int64(3))):
        assert band_alpha(p, good).window == (1, 3) and type(band_alpha(p, good).window[0]) is int
        assert BandAlphaFitter(good).windows == [(1, 3)]
    assert BandAlphaFitter([[1, 3], np.array([2, 5])]).windows == [(1, 3), (2, 5)]


def test_insufficient_rows_warning_states_the_rows_a_window_needs():
    """A covariance of n rows has rank n - 1, a gradient or weight spectrum of n rows rank n: the
    warning said 'needs more than 200 rows' for both, wrong by one for gradients (200 suffice)."""
    values = np.arange(1, 301.0) ** -1.0
    with pytest.warns(InsufficientRowsWarning, match=r"needs at least 201 rows, got n_rows=200"):
        BandAlphaFitter((100, 200)).fit(_spectrum(values, n_rows=200))
    with pytest.warns(InsufficientRowsWarning, match=r"needs at least 200 rows, got n_rows=199"):
        BandAlphaFitter((100, 200)).fit(_spectrum(values, n_rows=199, kind="gradient"))
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error", InsufficientRowsWarning)
        BandAlphaFitter((100, 200)).fit(_spectrum(values, n_rows=200, kind="gradient"))
        BandAlphaFitter((100, 200)).fit(_spectrum(values, n_rows=201))


@pytest.mark.parametrize("fn", [RankMe(), RankMe("singular_values"), participation_ratio, stable_rank])
def test_ranks_refuse_negative_eigenvalues_and_zero_round_off(fn):
    """An eigenvalue tensor with a negative entry beyond round-off is not a spectrum: RankMe of [1, -1] used
    to be 0.0, of [1, -0.5] 0.25 (participation ratio 0.2, stable rank 0.5), and an all-negative one
    'all zero'. Now ValueError naming the value; an eigensolver's round-off negatives still count as 0."""
    for bad in ([1.0, -1.0], [1.0, -0.5], [-1.0, -2.0], [1.0, 1.0, -1e-6]):
        with pytest.raises(ValueError, match=r"negative eigenvalue -[0-9.e-]+ \(largest"):
            fn(torch.tensor(bad, dtype=torch.float64))
    assert fn(torch.tensor([1.0, 1.0, -1e-17], dtype=torch.float64)) == pytest.approx(
        fn(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)), rel=1e-15)


def test_fits_refuse_non_finite_eigenvalues_in_their_window():
    """band_alpha on a window holding a NaN (or Inf) returned alpha=nan with r2=1.0 (a perfect fit, as
    reported) and estimate_crossover failed inside SciPy ('Residuals are not finite in the initial
    point'); both now raise ValueError naming the window and the rank. NaN outside the window is not read."""
    p = np.arange(1, 50.0) ** -1.0
    p[20] = np.nan
    with pytest.raises(ValueError, match=r"window \[1, 49\] holds a NaN/Inf eigenvalue \(first at rank 21\)"):
        estimate_crossover(p, ranks=(1, 49))
    with pytest.raises(ValueError, match=r"window \[10, 30\] holds a NaN/Inf eigenvalue \(first at rank 21\)"):
        band_alpha(p, (10, 30))
    p[20] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        band_alpha(p, (21, 30))
    assert band_alpha(p, (1, 20)).alpha == pytest.approx(1.0, abs=1e-12)
