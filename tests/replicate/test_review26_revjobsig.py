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
from support.lens_faults import overflow_on_second_measure  # noqa: E402
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
    from examples.toy.presets import PRESETS
    from examples.toy.workload import ToyWorkload

    calls = overflow_on_second_measure(monkeypatch, "blocks.1")
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


# ---- the report tells a run the lens could not measure ----------------------------------------------------------

_F = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0)


def _power(alpha):
    import torch

    from spectral_lens import Spectrum

    return Spectrum(values=torch.tensor([r ** -alpha for r in range(1, 65)], dtype=torch.float64), n_rows=500, dim=64)


def _run(root, tier, vals, *, stop_at=None, nan=False):
    """A hand-written Muon run (val loss ``vals[i]`` at progress ``_F[i]``, budget 1000); from ``stop_at`` on it is
    kept as diverged: with a NaN loss there (``nan``), or unmeasured with a finite one (the lens' error)."""
    from spectral_lens.records import RunInfo, RunWriter

    path = root / f"muon-b{tier}"
    info = RunInfo(path.name, family="Muon", batch_tier=tier, total_tokens=1000, n_layer=2,
                   primary_spectrum="act:blocks.1")
    with RunWriter(path, info, tail_window=(10, 40), fsync=False) as w:
        for i, f in enumerate(_F):
            if stop_at is not None and i >= stop_at:
                w.log(i, int(1000 * f), val_loss=math.nan if nan else vals[i])
                w.update_info(status="diverged", divergence="toy: validation loss nan" if nan else
                              "toy: the lens could not measure at step 4: act:blocks.1 overflowed")
                break
            w.log_measurement(i, int(1000 * f), {"act:blocks.1": _power(1.0 + f)}, val_loss=vals[i], progress=f,
                              scalars={"H_S": f, "H_peak": 0.5, "pc1_peak": 0.5})
        else:
            w.update_info(status="complete")
    return path


def test_the_reports_name_a_run_stopped_unmeasured(tmp_path, monkeypatch):
    # a run kept as diverged with finite losses reads as merely cut short to the verdict (the library's rule): the
    # speedrun's table called it "(diverged)" (the verdict did not), and the toy's report did not name it at all
    from types import SimpleNamespace

    from examples.replicate.verdict import unmeasured, unmeasured_note
    from examples.speedrun.summary import speedrun_sections
    from examples.toy import report
    from spectral_lens.records import open_runs

    vals = (4.0, 3.0, 2.5, 2.3, 2.2, 2.1, 2.05)
    runs = open_runs([_run(tmp_path, 16, vals), _run(tmp_path, 32, vals, stop_at=4),
                      _run(tmp_path, 64, vals, stop_at=4, nan=True)])
    assert [r.run_id for r in unmeasured(runs)] == ["muon-b32"]
    note = unmeasured_note(runs)
    assert note.startswith("Stopped unmeasured (kept, not retrained): muon-b32.") and "muon-b64" not in note
    assert unmeasured_note(runs[:1]) == ""

    monkeypatch.setattr(report, "_save", lambda fig, path: path)
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.2)
    assert note in "\n".join(report.toy_sections(wl, runs, tmp_path))

    preset = SimpleNamespace(name="t", profile="tiny", data="pydoc", budget=1000, rungs=(100,))
    sr = SimpleNamespace(preset=preset, target_loss=2.0, families=("Muon",), tiers=(16, 32, 64), unit="tokens",
                         fraction=0.2, window=(10, 40))
    text = "\n".join(speedrun_sections(sr, runs, tmp_path / "report"))
    assert "| muon-b32 | Muon | 32 | 2.200 (stopped unmeasured) |" in text and note in text
    assert "| muon-b64 | Muon | 64 | 2.300 (diverged) |" in text
