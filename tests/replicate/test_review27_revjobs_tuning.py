"""Review 27 (revjobs): the tuning stage imported the tuner (Optuna) even where ``OUT/tune/choices.json`` is there
and only read: a finished job's directory rerun without the tune extra (to rebuild its report) was refused with
"examples.tune needs Optuna". Optuna is needed only to tune. Played in a fresh interpreter where ``import optuna``
fails, as without the extra (removing Optuna from this one would leave two copies of its classes)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import sys
sys.modules["optuna"] = None  # `import optuna` raises ImportError, as without the tune extra
from pathlib import Path
from types import SimpleNamespace
from examples.replicate import tuning
from examples.tune.choices import write_choices
from examples.tune.trainable import Candidate

workdir = Path(sys.argv[1])
write_choices(workdir / "choices.json", {("Muon", 16): Candidate("Muon", 16, 1.0, {"lr": 0.002})},
              losses={("Muon", 16): 2.0}, meta=dict(rungs=[10], mode="synchronized", reference_tier=16))
workload = SimpleNamespace(families=("Muon",), tiers=(16,), reference_tier=16, name="w",
                           reference_lrs=lambda f: {"lr": 1e-3}, trainable=lambda: None)
settings = tuning.TunerSettings(rungs=(10,))
try:
    print("reused", tuning.choose_rates(workload, workdir, settings))
except ImportError as e:
    print("reused ImportError", e)
(workdir / "choices.json").unlink()
try:
    tuning.choose_rates(workload, workdir, settings)
except ImportError as e:
    print("tune ImportError", e)
"""


@pytest.mark.slow  # a fresh interpreter importing torch: ~3-6 s on the shared 2-core machine
def test_reused_choices_need_no_optuna(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tune")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "reused {('Muon', 16): {'lr': 0.002}}",  # read without Optuna
        "tune ImportError examples.tune needs Optuna: pip install 'spectral-lens[tune]'",  # tuning needs it: one line
    ], out.stdout
