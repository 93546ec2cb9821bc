"""Review 26 (revzoofix): a speedrun measured run whose validation loss turns non-finite stops there as diverged,
as the toy's runs do (merge 667e5df). It measured the broken model instead: the lens raised ``NonFiniteError``,
the run's record was marked ``failed`` and the job stopped with status 2; a rerun trained the same seed at the
same rates into the same divergence, so the job could never finish."""
import json
import math
from pathlib import Path

import torch

import examples.speedrun.workload as wl
from examples.replicate.runs import _status
from examples.speedrun.presets import PRESETS
from spectral_lens.analysis import divergence
from spectral_lens.records import open_runs


def test_a_nan_validation_loss_stops_the_measured_run_as_diverged(tmp_path, monkeypatch):
    real_train = wl.train
    evals = []

    def diverging_train(**kw):
        on_eval = kw["on_eval"]

        def hooked(model, step, tokens, val_loss):
            evals.append(val_loss)
            on_eval(model, step, tokens, val_loss)
            if len(evals) == 1:  # the weights blow up after the first evaluation: the next one is NaN
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(math.nan)
        return real_train(**{**kw, "on_eval": hooked})
    monkeypatch.setattr(wl, "train", diverging_train)
    w = wl.ZooWorkload(PRESETS["tiny"], verbose=False)
    family = w.families[0]
    run_dir = w.run(family, 4, w.reference_lrs(family), tmp_path / "run")  # returns: a result, not a crash
    assert len(evals) == 2 and math.isnan(evals[-1])  # stopped at the first NaN evaluation, not trained on
    assert _status(run_dir) == "diverged"
    extras = json.loads((run_dir / "run.json").read_text())["extras"]
    assert "validation loss nan" in extras["divergence"]
    (run,) = open_runs([Path(run_dir)])
    assert "diverged: val_loss nan" in divergence(run)  # the library's reading of the record agrees
    assert len(run.measurements) == 1  # the broken model was not measured
