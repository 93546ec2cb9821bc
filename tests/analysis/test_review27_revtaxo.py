"""Review 27 (revtaxo): an adversarial look at the taxo merge (dc9084c): predict's key, the batch-tier
caution, non-finite losses against a target everywhere, and ``Spectrum`` from a reversed numpy array.

References are float64 and written from the protocol text, not from the code."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


def _sweep(root, **kw):
    from spectral_lens.analysis.synthetic import write_theorem6_sweep

    return write_theorem6_sweep(root, (2, 4, 8), n_eval=20, n_measure=15, dim=256, grad_dim=64,
                                tail_window=(40, 80), **kw)


def _predict(args, capsys):
    from spectral_lens.cli import main

    assert main(["predict", *map(str, args)]) == 0
    return capsys.readouterr().out


def _keys(out):
    return [x for x in out.splitlines() if x.startswith("key: ")]


# ---- Spectrum from numpy arrays of any layout ---------------------------------------------------------------

def test_spectrum_takes_a_reversed_numpy_array():
    """``np.sort(x)[::-1]`` (descending eigenvalues, negative strides) raised torch's raw "At least one stride in
    the given numpy array is negative"; it is the same eigenvalues, so it builds."""
    x = np.random.default_rng(0).random(50)
    desc = np.sort(x)[::-1]
    assert desc.strides[0] < 0
    s = Spectrum(desc, n_rows=100, dim=50)
    assert s.values.dtype.is_floating_point and s.values.tolist() == sorted(x.tolist(), reverse=True)
    s32 = Spectrum(np.sort(x.astype(np.float32))[::-1], n_rows=100, dim=50)  # a float32 view too
    assert s32.values.tolist() == sorted(x.astype(np.float32).astype(np.float64).tolist(), reverse=True)
    desc[0] = 99.0  # the spectrum is not a view on the caller's array
    assert float(s.values[0]) == max(x)


def test_spectrum_from_a_read_only_or_ascending_view():
    """A read-only array (a memory-mapped file, ``np.broadcast_to``) builds without torch's "not writable"
    warning; a reversed view that is ascending is the library's clear "sorted descending" error."""
    v = np.linspace(3.0, 0.0, 7)
    v.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Spectrum(v, n_rows=10, dim=7).values.tolist() == v.tolist()
    with pytest.raises(ValueError, match="Spectrum.values must be sorted descending"):
        Spectrum(v[::-1], n_rows=10, dim=7)  # ascending, negative strides


# ---- predict's key ------------------------------------------------------------------------------------------

def test_predict_key_is_short_and_true_for_a_gradient_spectrum(tmp_path, capsys):
    """The key said "the activation spectrum's tail" also for ``--spectrum grad:...``, and its three lines were
    ~1,100 characters under a 3-row table; it names the spectrum and each line fits a wide terminal."""
    _sweep(tmp_path)
    out = _predict([tmp_path, "--spectrum", "grad:blocks.11.attn.c_proj", "--window", "5", "30"], capsys)
    keys = _keys(out)
    assert "(grad:blocks.11.attn.c_proj, ranks 5-30)" in keys[0] and "activation" not in " ".join(keys), keys
    out = _predict([tmp_path, "--target-loss", "3.0"], capsys)
    keys = _keys(out)
    assert all(len(k) <= 150 for k in keys), [len(k) for k in keys]
    assert sum(map(len, keys)) <= 700, sum(map(len, keys))
    # the key comes after the tables and before the Spearman line it explains
    lines = out.splitlines()
    assert lines.index(keys[0]) > max(i for i, x in enumerate(lines) if x.strip().startswith("3 "))
    assert lines.index(keys[-1]) < next(i for i, x in enumerate(lines) if x.startswith("Spearman rho ("))


def test_predict_key_prints_the_target_as_given(tmp_path, capsys):
    """``val loss <= 3`` for ``--target-loss 2.9999999`` (``:g``): the key must state the target the T column used."""
    _sweep(tmp_path)
    keys = _keys(_predict([tmp_path, "--target-loss", "2.9999999"], capsys))
    assert any("val loss <= 2.9999999;" in k for k in keys), keys


def test_predict_json_stays_strict_and_unchanged(tmp_path, capsys):
    """``--json`` has no key text and the same top-level schema; every value is strict JSON."""
    _sweep(tmp_path)
    for args, top in (([], {"fraction", "excluded", "notes", "families"}),
                      (["--target-loss", "3.0"], {"fraction", "excluded", "notes", "families", "target_loss", "score"})):
        out = _predict([tmp_path, "--json", *args], capsys)
        assert "key:" not in out
        doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
        assert set(doc) == top


# ---- the batch-tier caution ---------------------------------------------------------------------------------

def test_batch_tier_caution_only_across_tiers():
    """Seeds of one tier, 8 vs 8.0, and runs without a tier are not cautioned; 4 vs 8 is."""
    from spectral_lens.report import transition_flags

    def run(rid, tier):
        return SimpleNamespace(run_id=rid, info=SimpleNamespace(batch_tier=tier))

    assert transition_flags([(run("a-s0", 8), run("b-s1", 8)), (run("a", 8), run("b", 8.0)),
                             (run("a", None), run("b", 8)), (run("a", None), run("b", None))]) == []
    (flag,) = transition_flags([(run("a", 4), run("b", 8))])
    assert flag.startswith("transition a -> b: the runs are of batch tiers 4 and 8")


# ---- non-finite losses against a target ---------------------------------------------------------------------

def _run(root, run_id, points, *, family="Muon", tier=8):
    info = RunInfo(run_id, family=family, batch_tier=tier, total_tokens=600, n_layer=12, primary_spectrum="act")
    r = np.arange(1, 301, dtype=float)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, (t, loss) in enumerate(points):
            w.log(i, t, val_loss=loss, tokens_per_s=1000.0)
            w.log_measurement(i, t, {"act": Spectrum(r ** -(1.0 + t / 1000), n_rows=10_000, dim=300)}, val_loss=loss)
    return RunRecord.open(root / run_id)


def _ref_first(points, target):
    """Protocol sec. 5: the first checkpoint (token order) whose loss is a finite number <= target."""
    return next((t for t, loss in sorted(points) if math.isfinite(loss) and loss <= target), None)


def test_every_matched_loss_skips_a_minus_inf_loss(tmp_path):
    """tokens_to_target, measurement_at_loss, matched_loss and the toy report's matched-loss table agree: a
    ``-inf`` validation loss (an overflow) is no checkpoint at the target. The toy table took it as the match."""
    from examples.toy import report
    from spectral_lens.analysis import divergence, tokens_to_target
    from spectral_lens.analysis.efficiency import matched_loss, measurement_at_loss

    pts = [(100, 4.0), (200, -math.inf), (300, 3.5), (400, 2.9), (600, 2.5)]
    run = _run(tmp_path, "m-b8", pts)
    assert divergence(run) is None  # a finite loss follows: not a diverged run, so it stays in every table
    want = _ref_first(pts, 3.0)
    assert tokens_to_target(run, 3.0) == want == 400
    assert measurement_at_loss(run, 3.0).tokens == want
    assert matched_loss([run], 3.0)["m-b8"].measurement.tokens == want
    rows = report._matched([run], "Muon", 3.0, (10, 40))
    assert [(t, n, v) for t, n, v, *_ in rows] == [(8, want, 2.9)], rows
