"""A run recorded without ``RunInfo.total_tokens`` (and no stored progress) can never reach the early
fraction: before, the predictors raised ``FractionNotReachedError("no measurement with a known
progress yet")`` for it, so ``SweepController`` told every such tier to ``wait`` forever and
``spectral-lens predict`` blamed a run with five measurements for having none "yet"."""

from __future__ import annotations

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens.analysis import NoiseScalePredictor, SweepController, TailPredictor
from spectral_lens.analysis.early import FractionNotReachedError
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def _run(root, run_id, tier, total_tokens, n=5):
    info = RunInfo(run_id, family="f", batch_tier=tier, total_tokens=total_tokens, batch_size=tier)
    r = np.arange(1, 301, dtype=np.float64)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i in range(n):
            w.log_measurement(i * 10, i * 1000 * tier, {"act": Spectrum(r ** -(1 + 0.1 * i), n_rows=10_000, dim=300)},
                              scalars={"noise_scale": 10.0})
    return RunRecord.open(root / run_id)


@pytest.mark.parametrize("predictor", [TailPredictor, NoiseScalePredictor])
def test_a_run_without_total_tokens_is_an_error_naming_the_remedy_not_a_wait(tmp_path, predictor):
    runs = [_run(tmp_path, "a", 1, None), _run(tmp_path, "b", 2, None)]
    with pytest.raises(ValueError, match=r"run 'a': .*RunInfo.total_tokens .* is None") as info:
        SweepController(predictor()).decide(runs)
    assert not isinstance(info.value, FractionNotReachedError)
    with pytest.raises(ValueError, match=r"RunInfo\(total_tokens=\.\.\.\)"):
        predictor().fit(runs)


def test_a_run_just_launched_still_waits_and_total_tokens_makes_it_work(tmp_path):
    done = [_run(tmp_path, "a", 1, 20_000), _run(tmp_path, "b", 2, 40_000)]
    launched = _run(tmp_path, "c", 4, None, n=0)  # no measurement yet, whatever its RunInfo
    dec = SweepController().decide(done + [launched])["f"]
    assert not dec.ready and dec.waiting_tiers == [1, 2, 4]
    with pytest.raises(FractionNotReachedError, match="no measurement with a known progress yet"):
        TailPredictor().fit([launched])
    assert set(TailPredictor().fit(done).predict()["f"].tiers) == {1, 2}


def test_several_activation_spectra_error_names_the_cli_option(tmp_path, capsys):
    # a run recorded with SpectralLens(layers="all"): the CLI error used to say only "pass spectrum=NAME",
    # a Python keyword the command line does not have
    from spectral_lens.cli import main

    r = np.arange(1, 301, dtype=np.float64)
    info = RunInfo("deep", family="f", batch_tier=1, total_tokens=1000)
    with RunWriter(tmp_path / "deep", info, fsync=False) as w:
        w.log_measurement(0, 500, {"act:h.0": Spectrum(r**-1.0, n_rows=10_000, dim=300),
                                   "act:h.1": Spectrum(r**-1.2, n_rows=10_000, dim=300)})
    assert main(["predict", str(tmp_path / "deep")]) == 2
    assert "--spectrum NAME" in capsys.readouterr().err
