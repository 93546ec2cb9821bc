"""Review 26 (revjobsig): an adversarial review of the jobsig merge (e81f894). The toy's command line imported
torch before its SIGTERM handler was installed (a ``kill`` in its first seconds ended it without a word); a
toy run the lens cannot measure (``NonFiniteError`` with a finite loss) failed the job on every rerun, where
the speedrun's is kept as diverged; the zoo trainer's divergence checks against the zoo's legitimate runs."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.replicate.runs import _status
from spectral_lens import NonFiniteError
from spectral_lens.records import RunRecord

ROOT = Path(__file__).resolve().parents[2]


def test_the_toy_cli_imports_no_torch_before_its_sigterm_handler():
    # `python -m examples.toy` imported examples.toy.presets (torch, spectral_lens: a second or more) at module
    # level, before main() installed the SIGTERM handler: a kill then ended it silently with -15, not one line
    # and 143 (the tuner's command line was fixed the same way: its imports deferred into main())
    probe = ("import sys, examples.toy.__main__, examples.speedrun.__main__; "
             "print(sorted(m for m in ('torch', 'spectral_lens', 'optuna', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_the_toy_cli_still_exposes_its_presets():
    # tests (and users) patch examples.toy.__main__.PRESETS: the same dict the job reads
    import examples.toy.__main__ as toy_main
    from examples.toy.presets import PRESETS

    assert toy_main.PRESETS is PRESETS
    with pytest.raises(AttributeError):
        toy_main.no_such_name  # noqa: B018


def test_a_toy_run_the_lens_cannot_measure_is_kept_as_diverged_not_failed(tmp_path, monkeypatch):
    # as the speedrun's (item 4 of the merge): a NonFiniteError (a ValueError) of the lens with a finite loss
    # left the toy's record failed, the job stopped with status 2, and the rerun trained into the same error
    import spectral_lens as sl
    from examples.toy.presets import PRESETS
    from examples.toy.workload import ToyWorkload

    real, calls = sl.SpectralLens.measure, []

    def overflowing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteError("act:blocks.1: the second moments overflowed to Inf ... float32 products")
        return real(self, *a, **kw)
    monkeypatch.setattr(sl.SpectralLens, "measure", overflowing)
    preset = dataclasses.replace(PRESETS["smoke"], tiers=(4,), reference_tier=4, budget=160, gradient_samples=8,
                                 measure_fractions=(0.0, 0.5, 1.0), eval_every=0.25)
    run_dir = ToyWorkload(preset).run("Muon", 4, {"embed": 3e-3, "hidden": 0.02}, tmp_path / "muon-b4")
    assert _status(run_dir) == "diverged"
    divergence = json.loads((run_dir / "run.json").read_text())["extras"]["divergence"]
    assert "the lens could not measure" in divergence and "overflowed" in divergence
    run = RunRecord.open(run_dir)
    assert len(run.measurements) == 1 and len(calls) == 2
    _, losses = run.val_curve()
    # the validation loss at the unmeasurable point was finite: the record must not say NaN there
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
