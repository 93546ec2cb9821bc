"""Review 30 (revanalysis30): adversarial review of the analysis30 merge. Its new refusals must not
reject input the library and its users pass: noisy energies in mode order over a window whose trend is
weaker than the noise (the crossover's ascending check compared two noisy endpoints), raw eigensolver
output with round-off negatives (js_divergence), spectra with a real bend or plateau (``located``), and
NumPy-typed controller arguments. References are float64 and written from the protocol's text.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from spectral_lens import Spectrum
from spectral_lens.analysis import SweepController, TailPredictor, js_divergence
from spectral_lens.analysis.noise_predictor import NoiseScalePredictor
from spectral_lens.spectra import estimate_crossover

R = np.arange(1, 769, dtype=np.float64)


def _theorem6(p=1.0, eta_t=5.0, q=0.6):
    """Theorem-6 activation energies ``r^-p (1 - exp(-eta t r^-q))^2`` in mode order, trace-normalized."""
    lam = R**-p * (-np.expm1(-eta_t * R**-q)) ** 2
    return lam / lam.sum()


# ----------------------------------------------------------------------------- crossover: where the ascending line is


@pytest.mark.parametrize(
    "energies, ranks",
    [
        # a shallow spectrum with 5% noise: the trend over ranks 700-768 (-0.7%) is below the noise
        (_theorem6(0.2, 1.0, 0.1) * np.exp(0.05 * np.random.default_rng(0).standard_normal(768)), (700, 768)),
        (_theorem6(0.2, 1.0, 0.1) * np.exp(0.05 * np.random.default_rng(1).standard_normal(768)), (700, 768)),
        # a noise floor (the tail flattening of measured energies), fitted inside it
        (_theorem6() + 1e-4 * np.exp(0.1 * np.random.default_rng(6).standard_normal(768)), (300, 700)),
    ],
)
def test_crossover_fits_noisy_energies_in_mode_order_whose_last_rank_is_higher(energies, ranks):
    """The merge refused a window whose last value exceeds its first ('pass the eigenvalues largest
    first ... eigvalsh'), so noisy energies in mode order, which its docstring says are fitted as given,
    were refused by the draw of two noisy endpoints: 37% of such windows at 5% noise, 10% in a noise
    floor. Only eigvalsh's order (a window that never falls) is refused now."""
    lo, hi = ranks
    assert energies[hi - 1] > energies[lo - 1]  # the case: it ends higher, yet falls and rises inside
    assert np.any(np.diff(energies[lo - 1 : hi]) < 0)
    for method in ("bend", "broken_stick"):
        fit = estimate_crossover(energies, ranks=ranks, method=method)
        assert fit.ranks == ranks and math.isfinite(fit.rank) and math.isfinite(fit.improvement)


def test_crossover_still_refuses_every_ascending_eigensolver_output():
    """eigvalsh / eigh return eigenvalues ascending (ties kept): refused whatever the window, with ties,
    and as float32; a flat window, a descending one with ties and a single rise inside are not."""
    g = np.random.default_rng(3)
    x = torch.as_tensor(g.standard_normal((400, 64)) * np.arange(1, 65) ** -0.8)
    ev = torch.linalg.eigvalsh(x.T @ x / 399)  # ascending, full rank
    for v in (ev, ev.float(), ev.numpy() / float(ev.sum())):
        with pytest.raises(ValueError, match=r"ranks \[1, 64\]: the spectrum rises from .* pass the eigenvalues largest"):
            estimate_crossover(v)
        with pytest.raises(ValueError, match=r"ranks \[10, 40\]: the spectrum rises"):
            estimate_crossover(v, ranks=(10, 40), method="broken_stick")
    steps = np.repeat([0.5, 1.0, 2.0, 4.0], 8)  # ascending with ties
    with pytest.raises(ValueError, match="rises from 0.5 at rank 1 to 4 at rank 32"):
        estimate_crossover(steps)
    assert not estimate_crossover(np.full(32, 1.0)).located  # flat: neither rises nor falls
    assert math.isfinite(estimate_crossover(steps[::-1].copy()).rank)  # descending with ties
    bumped = _theorem6()
    bumped[400] = bumped[398]  # one local rise
    assert estimate_crossover(bumped).located


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("ranks", [None, (5, 40)])
def test_crossover_names_the_order_of_a_rank_deficient_eigvalsh_output(clamp, ranks):
    """eigvalsh of a covariance of fewer rows than dimensions (the usual case for gradient spectra) puts
    its round-off first: the ascending check was never reached, and the error named a negative eigenvalue
    at rank 1 ('clamp it'), then, clamped, 'reaches zero eigenvalues: only 160 are nonzero'. The order is
    named now; the error still says which window check failed."""
    g = np.random.default_rng(11)
    x = torch.as_tensor(g.standard_normal((64, 256)) * np.arange(1, 257) ** -0.7)
    ev = torch.linalg.eigvalsh((x - x.mean(0)).T @ (x - x.mean(0)) / 63)
    ev = ev.clamp_min(0) if clamp else ev
    why = "reaches zero eigenvalues" if clamp else "negative eigenvalue"
    with pytest.raises(ValueError, match=rf"rises from .* at rank 1 to .* at rank 256 and never falls .*{why}.* "
                                         r"pass the eigenvalues largest first"):
        estimate_crossover(ev, ranks=ranks)
    assert estimate_crossover(ev.flip(0).clamp_min(0), ranks=ranks).ranks == (ranks or (1, 63))
    with pytest.raises(ValueError, match=r"^window \[200, 256\] reaches zero eigenvalues"):  # not ascending: as before
        estimate_crossover(ev.flip(0).clamp_min(0), ranks=(200, 256))


# ----------------------------------------------------------------------------- located: real bends stay located


@pytest.mark.parametrize("method", ["bend", "broken_stick"])
@pytest.mark.parametrize("k", [20, 80])
def test_crossover_of_a_plateau_or_two_power_laws_is_located(method, k):
    """``located`` now needs ``improvement > 0``: a flat head before a power-law tail (a plateau) and a
    bend between two power laws keep a located crossover near their break, with either method."""
    plateau = np.where(R <= k, 1.0, (R / k) ** -2.0)
    two = np.where(R <= k, R**-0.8, k**1.2 * R**-2.0)
    for lam in (plateau, two):
        fit = estimate_crossover(lam / lam.sum(), method=method)
        assert fit.located and fit.improvement > 0.9
        assert k / 3 < fit.rank < 3 * k


# ----------------------------------------------------------------------------- js_divergence against the old formula


def _jsd_before(a, b):
    """The pre-merge formula: clip negatives to 0, divide by the sum, scipy's JS distance squared."""
    p, q = (np.clip(np.asarray(v, dtype=np.float64), 0.0, None) for v in (a, b))
    p, q = p / p.sum(), q / q.sum()
    n = max(p.size, q.size)
    d = float(jensenshannon(np.pad(p, (0, n - p.size)), np.pad(q, (0, n - q.size))))
    return 0.0 if math.isnan(d) else min(d * d, math.log(2.0))


def test_js_divergence_is_the_old_formula_on_ordinary_spectra():
    """Scaling by the largest eigenvalue first changes nothing beyond 1e-15 on spectra of ordinary scale."""
    g = np.random.default_rng(7)
    worst = 0.0
    for i in range(200):
        a = np.sort(g.random(int(g.integers(2, 200))))[::-1] * 10.0 ** g.uniform(-20, 20)
        b = (np.arange(1.0, g.integers(2, 200)) ** -g.uniform(0.2, 3.0)) * 10.0 ** g.uniform(-20, 20)
        worst = max(worst, abs(js_divergence(a, b) - _jsd_before(a, b)))
    assert worst <= 1e-15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d, n", [(256, 32), (1024, 64)])
def test_js_divergence_takes_raw_eigvalsh_of_a_rank_deficient_covariance(dtype, d, n):
    """torch.linalg.eigvalsh of a covariance of fewer rows than dimensions returns round-off negatives
    (~1e-16 of the largest in float64, ~1e-7 in float32): counted as 0, as RankMe counts them, not
    refused; the divergence is the clamped float64 one."""
    g = np.random.default_rng(d + n)
    x = torch.as_tensor(g.standard_normal((n, d)), dtype=dtype)
    x = x - x.mean(0)
    asc = torch.linalg.eigvalsh(x.T @ x / (n - 1))
    ev = asc.flip(0)
    assert float(ev.min()) < 0  # the case: raw round-off negatives
    ref = Spectrum(ev.double().clamp_min(0), n_rows=n, dim=d)
    other = np.arange(1.0, d + 1) ** -1.1
    for raw in (ev, ev.numpy(), asc.numpy()[::-1]):  # the last a view with negative strides
        assert js_divergence(raw, other) == pytest.approx(_jsd_before(ref.values.numpy(), other), abs=1e-15)
        assert js_divergence(raw, ref) <= 1e-15


# ----------------------------------------------------------------------------- controller arguments of NumPy types


def test_controller_and_predictors_take_numpy_scalars():
    """The build-time checks accept what a config read through NumPy yields: np.int64 keep and neighbors,
    np.float32 rules, bounds 0 and 1 included."""
    c = SweepController(keep=np.int64(2), n_sigma=np.float32(0.0), margin=np.float64(0.5), min_probability=np.int64(1))
    assert c.keep == 2
    SweepController(min_probability=0.0, n_sigma=math.inf)
    for cls in (TailPredictor, NoiseScalePredictor):
        p = cls(noise_neighbors=np.int64(3), n_draws=np.uint16(10))
        assert p.noise_neighbors == 3 and p.n_draws == 10


# ----------------------------------------------------------------------------- js_divergence: NumPy's extended precision


@pytest.mark.skipif(np.finfo(np.longdouble).bits <= 64, reason="long double is float64 on this platform")
def test_js_divergence_and_ranks_take_numpys_long_double():
    """js_divergence read its input with np.asarray(..., float64) before review 30; through the effective
    ranks' reader a float128 array was refused as 'needs a Spectrum or a 1-D tensor ... got ndarray'
    (torch has no such dtype). Read as float64, the library's precision."""
    from spectral_lens import RankMe, participation_ratio

    a = np.array([3.0, 1.0, 0.5], dtype=np.longdouble)
    assert js_divergence(a, [2.0, 2.0, 0.1]) == pytest.approx(_jsd_before([3.0, 1.0, 0.5], [2.0, 2.0, 0.1]), abs=1e-15)
    assert RankMe()(a) == pytest.approx(RankMe()(np.array([3.0, 1.0, 0.5])), rel=1e-15)
    assert participation_ratio(a) == pytest.approx(participation_ratio(np.array([3.0, 1.0, 0.5])), rel=1e-15)
    with pytest.raises(ValueError, match="NaN/Inf"):  # beyond float64's range: Inf, refused as such
        js_divergence(np.array([1e400, 1.0], dtype=np.longdouble), [1.0, 1.0])
