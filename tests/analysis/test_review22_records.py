"""Review 22: a run's record says when it failed, and the sweep readers read it; one learning rate reads the
same as ``lr=x`` or as ``lrs={"group": x}``.

Before, ``RunWriter.close`` (which also runs on errors) left no mark: a run that crashed read as still going, or,
past 95% of its budget, as finished."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import warnings

import pytest

from spectral_lens.analysis import (
    SweepController,
    SweepWarning,
    divergence,
    ended,
    failure,
    pick_learning_rates,
    token_inefficiency,
)
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter, open_runs
from spectral_lens.report import run_status


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _run(path, events=(), *, raises=None, total=10_000, **extras):
    """A run logging ``(tokens, val_loss)`` events in a ``with RunWriter`` block that then raises ``raises``."""
    with pytest.raises(type(raises)) if raises is not None else contextlib.nullcontext():
        with RunWriter(path, RunInfo(path.name, family="f", batch_tier=4, total_tokens=total, extras=extras),
                       fsync=False) as w:
            for i, (tokens, loss) in enumerate(events):
                w.log(i + 1, tokens, val_loss=loss)
            if raises is not None:
                raise raises
    return path


# ---- the writer records a failure ---------------------------------------------------------------------------------


def test_a_with_block_ending_in_an_exception_marks_the_run_failed_and_a_clean_exit_marks_nothing(tmp_path):
    _run(tmp_path / "crash", [(1000, 3.0)], raises=RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"))
    assert _extras(tmp_path / "crash") == {"status": "failed", "failure": "RuntimeError: CUDA out of memory."}
    _run(tmp_path / "ctrl-c", raises=KeyboardInterrupt())
    assert _extras(tmp_path / "ctrl-c") == {"status": "failed", "failure": "KeyboardInterrupt"}
    _run(tmp_path / "exit1", raises=SystemExit(1))
    assert _extras(tmp_path / "exit1")["failure"] == "SystemExit: 1"
    _run(tmp_path / "exit0", raises=SystemExit(0))  # sys.exit(): no failure
    assert _extras(tmp_path / "exit0") == {}
    with RunWriter(tmp_path / "stopped", RunInfo("stopped", total_tokens=10_000), fsync=False) as w:
        for step in range(10):
            w.log(step, step * 100, train_loss=3.0)
            if step == 3:
                break  # an early stop: a clean exit is no completion either
    assert _extras(tmp_path / "stopped") == {}
    # a status that says the run ended is kept; the exception is recorded as failure_after_end (review 22
    # follow-up: a "failure" key beside "complete" read as the run's failure)
    _run(tmp_path / "nan", [(1000, math.nan)], raises=FloatingPointError("loss is nan"), status="diverged")
    assert _extras(tmp_path / "nan") == {"status": "diverged", "failure_after_end": "FloatingPointError: loss is nan"}


def test_the_failure_mark_never_replaces_the_blocks_exception(tmp_path, monkeypatch):
    """A run.json that cannot be written (the full disk the error was about) is a RecordWarning, and the block's
    exception is raised; a writer closed inside the block (its lock released) writes nothing."""
    import spectral_lens.records.writer as writer_module

    def full(*args, **kw):
        raise OSError(28, "No space left on device")

    with pytest.raises(ZeroDivisionError), pytest.warns(RecordWarning, match=r"could not record the run's failure "
                                                        r"\(ZeroDivisionError: boom\) in run.json: OSError"):
        with RunWriter(tmp_path / "full", RunInfo("full"), fsync=False):
            monkeypatch.setattr(writer_module, "_write_json_atomic", full)
            raise ZeroDivisionError("boom")
    monkeypatch.undo()
    assert _extras(tmp_path / "full") == {}
    with pytest.raises(ValueError, match="later"):
        with RunWriter(tmp_path / "closed", RunInfo("closed"), fsync=False) as w:
            w.close()
            raise ValueError("later")
    assert _extras(tmp_path / "closed") == {}


def test_a_failed_run_resumed_is_running_again(tmp_path):
    path = _run(tmp_path / "r", [(1000, 3.0)], raises=RuntimeError("preempted"), lr=1e-3)
    assert failure(RunRecord.open(path)) == "failed (RuntimeError: preempted)"
    with RunWriter(path, resume=True, fsync=False) as w:
        assert {k: v for k, v in w.info.extras.items() if k != "failure_history"} == {"lr": 1e-3, "status": "running"}
        w.log(2, 2000, val_loss=2.9)
    # review 23: the resumed run went on and ended cleanly: no status (not "running" forever), failure kept in history
    assert {k: v for k, v in _extras(path).items() if k != "failure_history"} == {"lr": 1e-3}
    assert failure(RunRecord.open(path)) is None


# ---- the readers read it ----------------------------------------------------------------------------------------


def test_a_failed_run_is_cut_short_not_finished_and_its_last_nan_is_a_divergence(tmp_path, capsys):
    crash = RunRecord.open(_run(tmp_path / "crash", [(1000, 3.0), (4000, 2.9)], raises=RuntimeError("boom")))
    assert failure(crash) == "failed (RuntimeError: boom)" and not ended(crash) and divergence(crash) is None
    assert run_status(crash) == "failed (RuntimeError) at 40% of budget"  # before: "ends at 40% of budget"
    assert main(["inspect", str(tmp_path / "crash")]) == 0
    assert "  status: failed (RuntimeError: boom) at 40% of budget\n" in capsys.readouterr().out
    # a run that failed past 95% of its budget: finished; the status says it failed
    late = RunRecord.open(_run(tmp_path / "late", [(1000, 3.0), (9600, 2.9)], raises=OSError("disk full")))
    assert ended(late) and run_status(late) == "failed (OSError) at 96% of budget"
    # a loop that raises on a NaN loss it logged: diverged (before: one NaN of a run still going, not judged)
    nan = RunRecord.open(_run(tmp_path / "nan", [(1000, 3.0), (2000, math.nan)], raises=FloatingPointError("nan")))
    assert "diverged: val_loss nan at step 2" in divergence(nan)
    # the target not reached by the failed run: unknown (NaN), with a note naming the failure; reached: counted
    fast = RunRecord.open(_run(tmp_path / "fast", [(1000, 3.0), (3000, 2.5)]))
    with pytest.warns(SweepWarning, match=r"run 'crash' has records to 40% of its token budget and has not reached "
                                          r"val loss 2.6: it failed \(RuntimeError: boom\), cut short, not slow"):
        eps = token_inefficiency([crash, fast], 2.6)
    assert math.isnan(eps["crash"]) and eps["fast"] == 1.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("review22") / "base"
    write_theorem6_sweep(root, (2, 4, 8), family="toy", dim=128, grad_dim=64, n_measure=10, n_eval=20,
                         tail_window=(10, 40))
    return root


def test_the_controller_says_a_tier_waits_on_a_failed_run(base, tmp_path):
    """A tier whose run failed before the decision's fraction waits (it may be resumed), and the reason says
    the run failed, not only that it is not at the fraction yet."""
    d = tmp_path / "sweep"
    shutil.copytree(base, d)
    header = json.loads((d / "toy-b8" / "run.json").read_text())
    info = RunInfo.from_dict({**header, "run_id": "toy-b16", "batch_tier": 16})
    with pytest.raises(RuntimeError):
        with RunWriter(d / "toy-b16", info, fsync=False, tail_window=(10, 40)) as w:
            w.log(1, 1000, train_loss=5.0)
            raise RuntimeError("NCCL timeout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = SweepController().decide(open_runs([d]))["toy"]
    by_tier = {x.tier: x for x in dec.decisions}
    assert not dec.ready and by_tier[16].action == "wait"
    assert "it failed (RuntimeError: NCCL timeout): resume it, or leave it out of the runs" in by_tier[16].reason


# ---- one learning rate, two spellings ---------------------------------------------------------------------------


def test_lrs_of_one_group_and_lr_are_one_rate(tmp_path):
    def run(rid, loss, **extras):
        with RunWriter(tmp_path / rid, RunInfo(rid, family="f", batch_tier=8, extras=extras), fsync=False) as w:
            w.log(1, 10_000, val_loss=loss)
        return tmp_path / rid

    runs = [run("a", 3.0, lr=1e-3), run("b", 2.9, lrs={"lr": 0.0010000000000000002}), run("c", 2.8, lrs={"adam": "0.001"})]
    kept, left = pick_learning_rates(open_runs(runs))
    assert left == {} and [r.run_id for r in kept] == ["a", "b", "c"]  # before: 3 rates, b and c left out
    # a rate that differs is still another rate; several groups are still told apart
    runs += [run("d", 2.0, lrs={"lr": 2e-3}), run("e", 2.5, lrs={"adam": 1e-3, "muon": 1e-3})]
    kept, left = pick_learning_rates(open_runs(runs))
    assert [r.run_id for r in kept] == ["d"] and "the best, lrs lr=0.002 (" in left["a"] and len(left) == 4, left
