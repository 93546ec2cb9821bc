"""Review 27 (revjobs): the tuning stage imported the tuner (Optuna) even where ``OUT/tune/choices.json`` is there
and only read: a finished job's directory rerun without the tune extra (to rebuild its report) was refused with
"examples.tune needs Optuna". Optuna is needed only to tune."""
import sys
from types import SimpleNamespace

import pytest

from examples.replicate import tuning
from examples.tune.choices import write_choices
from examples.tune.trainable import Candidate


def test_reused_choices_need_no_optuna(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "optuna" or m.startswith(("optuna.", "examples.tune.tuner",
                                                                           "examples.tune.worker",
                                                                           "examples.tune.trials"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError, as without the extra
    workdir = tmp_path / "tune"
    write_choices(workdir / "choices.json", {("Muon", 16): Candidate("Muon", 16, 1.0, {"lr": 0.002})},
                  losses={("Muon", 16): 2.0}, meta=dict(rungs=[10], mode="synchronized", reference_tier=16))
    workload = SimpleNamespace(families=("Muon",), tiers=(16,), reference_tier=16, name="w")
    settings = tuning.TunerSettings(rungs=(10,))
    try:
        got = tuning.choose_rates(workload, workdir, settings)
    except ImportError as e:  # pragma: no cover - the failure this test pins
        pytest.fail(f"reading the choices needed Optuna: {e}")
    assert got == {("Muon", 16): {"lr": 0.002}}
    (workdir / "choices.json").unlink()  # to tune, Optuna is needed: one line, ImportError
    with pytest.raises(ImportError, match="needs Optuna"):
        tuning.choose_rates(workload, workdir, settings)
