"""Review 22 (adversarial review of the failure mark): a resume that does not open keeps the mark; an
exception whose message cannot be read is still the one raised; the report's status reads the failure as
``failure(run)`` does; the controller's wait names a failed run of its tier."""

from __future__ import annotations

import json
import warnings

import pytest

from spectral_lens.analysis import SweepController, failure
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter, open_runs
from spectral_lens.report import run_status


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _failed(path, exc=RuntimeError("preempted"), total=10_000, **extras):
    with pytest.raises(type(exc)):
        with RunWriter(path, RunInfo(path.name, family="f", batch_tier=4, total_tokens=total, extras=extras),
                       fsync=False) as w:
            w.log(1, 4000, val_loss=3.0)
            raise exc
    return path


def test_a_resume_that_fails_to_open_keeps_the_failure_mark(tmp_path):
    """The mark was withdrawn ("running") before the resumed writer opened its files: a resume refused after
    that (a last line longer than 1 MiB without a newline; a RecordWarning raised as an error) left a run
    that no writer holds marked as running, its failure gone."""
    path = _failed(tmp_path / "r")
    with open(path / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 2, "tok')  # review 30: a line longer than 1 MiB is cut as any other now
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)
        with pytest.raises(RecordWarning, match="truncated last line"):
            RunWriter(path, resume=True, fsync=False)
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}
    (path / "log.jsonl").write_bytes(b"")  # the resume that opens withdraws it
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.info.extras["status"] == "running" and "failure" not in w.info.extras
    # review 23: a resume that recorded nothing restores the failure on exit (before: "running" forever)
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}


def test_an_exception_whose_message_cannot_be_read_is_still_the_one_raised(tmp_path):
    """str() of the block's exception raising (a broken __str__) replaced the block's exception with that
    error, and marked nothing."""

    class Opaque(Exception):
        def __str__(self):
            raise ValueError("no message")

    with pytest.raises(Opaque):
        with RunWriter(tmp_path / "o", RunInfo("o"), fsync=False):
            raise Opaque()
    assert _extras(tmp_path / "o") == {"status": "failed", "failure": f"{Opaque.__module__}.{Opaque.__qualname__}"}


def test_the_report_status_reads_a_failure_as_failure_does(tmp_path):
    """A failure that is not text (a run.json written by hand) is no exception type: failure() says "failed",
    and the report's status said "failed (3)"."""
    with RunWriter(tmp_path / "h", RunInfo("h", total_tokens=10_000, extras={"status": "failed", "failure": 3}),
                   fsync=False) as w:
        w.log(1, 4000, val_loss=3.0)
    r = RunRecord.open(tmp_path / "h")
    assert failure(r) == "failed" and run_status(r) == "failed at 40% of budget"
    r = RunRecord.open(_failed(tmp_path / "t", RuntimeError("CUDA out of memory: tried 2 GiB")))
    assert run_status(r) == "failed (RuntimeError) at 40% of budget"


def test_the_controllers_wait_names_the_failed_run_of_its_tier(tmp_path):
    """A tier waited on a run still going and on a failed one: the reason named only the first run's (its
    progress), so the failure, the one thing to act on, was not said while another seed was running."""
    d = tmp_path / "sweep"
    write_theorem6_sweep(d, (2, 4, 8), family="toy", dim=128, grad_dim=64, n_measure=10, n_eval=20,
                         tail_window=(10, 40))
    header = json.loads((d / "toy-b8" / "run.json").read_text())
    with RunWriter(d / "a-going", RunInfo.from_dict({**header, "run_id": "a-going", "batch_tier": 16}),
                   fsync=False, tail_window=(10, 40)) as w:
        w.log(1, 1000, train_loss=5.0)
    with pytest.raises(RuntimeError):
        with RunWriter(d / "b-failed", RunInfo.from_dict({**header, "run_id": "b-failed", "batch_tier": 16}),
                       fsync=False, tail_window=(10, 40)) as w:
            w.log(1, 1000, train_loss=5.0)
            raise RuntimeError("NCCL timeout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = SweepController().decide(open_runs([d]))["toy"]
    by_tier = {x.tier: x for x in dec.decisions}
    assert by_tier[16].action == "wait" and by_tier[16].run_ids == ("a-going", "b-failed")
    assert "b-failed" in by_tier[16].reason and "it failed (RuntimeError: NCCL timeout)" in by_tier[16].reason
