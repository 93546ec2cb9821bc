"""Review 27 (revjobs): the train stage's progress lines called a run stopped unmeasured (kept as
``status: "diverged"`` with finite losses: the lens could not measure it) ``diverged``, where the printed verdict
and the report say it was stopped unmeasured and counted as cut short, not diverged."""
import importlib.util
import io
import shutil
from pathlib import Path

from examples.replicate.runs import train_runs

_spec = importlib.util.spec_from_file_location("_revjobsig", Path(__file__).with_name("test_review26_revjobsig.py"))
_revjobsig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_revjobsig)
VALS = (4.0, 3.0, 2.5, 2.3, 2.2, 2.1, 2.05)


class _Kept:
    """A workload whose runs are hand-written records: tier 32 stopped unmeasured, tier 64 diverged (NaN)."""
    name, unit, families, tiers, reference_tier, target_loss, budget = "fake", "examples", ("Muon",), (16, 32, 64), 16, \
        2.0, 1000

    def __init__(self, made):
        self.made = made

    def run(self, family, tier, lrs, run_dir):
        made = _revjobsig._run(self.made, tier, VALS, stop_at=None if tier == 16 else 4, nan=tier == 64)
        shutil.copytree(made, run_dir)
        return run_dir


def test_the_progress_lines_say_stopped_unmeasured_as_the_verdict_does(tmp_path):
    lrs = {("Muon", t): {"lr": 1e-3} for t in (16, 32, 64)}
    log = io.StringIO()
    train_runs(_Kept(tmp_path / "made"), lrs, tmp_path / "runs", stream=log)
    text = log.getvalue()
    assert "muon-b32 stopped unmeasured (lrs" in text and "muon-b32 diverged" not in text, text
    assert "muon-b64 diverged (lrs" in text and "muon-b16 done (lrs" in text, text
    log = io.StringIO()
    train_runs(_Kept(tmp_path / "made2"), lrs, tmp_path / "runs", stream=log)  # the rerun keeps both
    assert ("3 of 3 runs already complete; training 0 x 1,000 examples (kept as diverged: muon-b64; kept as "
            "stopped unmeasured: muon-b32)") in log.getvalue(), log.getvalue()
