"""Review 22 follow-up on the failure mark: a failed run reads as failed (cut short) in the report's T column, the
taxonomy and predict's notes, not as "not reached yet" / "cut short or still running"; a run.json with
``"extras": null`` is read as ``{}`` by every reader and by the writer (resume and the failure mark raised
``AttributeError``); a writer opened on a run whose record had already ended (a script measuring a finished run's
checkpoints) does not mark the run failed, and no ``failure`` key is left beside ``"complete"``."""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest

from spectral_lens.analysis import (
    UNDETERMINED,
    TransitionClassifier,
    ended,
    failure,
    transition_evidence,
)
from spectral_lens.analysis.tail import TailPredictor
from spectral_lens.cli import main
from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.report import build_report, run_status
from spectral_lens.spectrum import Spectrum


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _run(root, run_id, losses, budget_evals, raises=None, **extras):
    """A validation loss and a measurement per 100 tokens, of a budget of ``budget_evals`` * 100 tokens; the
    block then raises ``raises``."""
    info = RunInfo(run_id, family="f", batch_tier=8, total_tokens=budget_evals * 100, n_layer=12, extras=extras)
    r = np.arange(1, 301, dtype=float)
    expect = pytest.raises(type(raises)) if raises is not None else contextlib.nullcontext()
    with expect, RunWriter(root / run_id, info, fsync=False) as w:
        for i, loss in enumerate(losses):
            w.log(i, (i + 1) * 100, val_loss=loss, tokens_per_s=1000.0)
            w.log_measurement(i, (i + 1) * 100, {"act": Spectrum(r**-1.0, n_rows=10_000, dim=300)}, val_loss=loss)
        if raises is not None:
            raise raises
    return RunRecord.open(root / run_id)


# ---- 1: a failed run's wording --------------------------------------------------------------------------------


def test_a_failed_run_reads_as_failed_in_the_report_and_the_taxonomy(tmp_path):
    base = _run(tmp_path, "base", [4.0, 3.6, 3.3, 3.1, 3.0, 2.9], 6)
    crash = _run(tmp_path, "crash", [4.0, 3.7, 3.5], 6, raises=RuntimeError("NCCL timeout"))
    going = _run(tmp_path, "going", [4.0, 3.7, 3.5], 6)
    assert failure(crash) == "failed (RuntimeError: NCCL timeout)" and not ended(crash)
    res = TransitionClassifier().classify(transition_evidence(base, crash, 2.95))
    assert res.label == UNDETERMINED and res.evidence.details["failed_b"] == failure(crash)
    # before: "crash has not reached the target 2.95 yet (its record does not say it ended: cut short or still running)"
    assert res.rule.startswith("rule 0: crash has not reached the target 2.95: it failed (RuntimeError: NCCL "
                               "timeout), cut short: the token gain is undefined"), res.rule
    both = TransitionClassifier().classify(transition_evidence(going, crash, 2.95))
    assert both.rule.startswith("rule 0: going has not reached the target 2.95 yet (its record does not say it "
                                "ended: cut short or still running); crash has not reached the target 2.95: it "
                                "failed"), both.rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = build_report([base, crash, going], tmp_path / "rep", target_loss=2.95, plots=False)
    cells = {}
    for line in rep.path.read_text().splitlines():
        if line.startswith(("| crash |", "| going |")):
            row = [c.strip() for c in line.strip("|").split("|")]
            cells[row[0]] = (row[5], row[9])
    assert cells["crash"] == ("not reached (failed)", "failed (RuntimeError) at 50% of budget"), cells  # before: "not reached yet"
    assert cells["going"] == ("not reached yet", "ends at 50% of budget"), cells


def test_predicts_note_says_a_run_left_out_before_the_fraction_failed(tmp_path, capsys):
    """A failed run short of the early fraction is left out with a note: the note said only where its latest
    measurement is, as for a run still going."""
    for tier, rid in ((2, "a"), (4, "b")):
        info = RunInfo(rid, family="f", batch_tier=tier, total_tokens=1000, n_layer=12)
        r = np.arange(1, 301, dtype=float)
        with RunWriter(tmp_path / rid, info, fsync=False, tail_window=(10, 40)) as w:
            for i in range(1, 11):
                w.log_measurement(i, i * 100, {"act": Spectrum(r ** -(1.0 + tier / 10 + i / 100), n_rows=10_000,
                                                               dim=300)}, val_loss=4.0 - i / 10)
    info = RunInfo("c", family="f", batch_tier=8, total_tokens=1000, n_layer=12)
    with pytest.raises(RuntimeError), RunWriter(tmp_path / "c", info, fsync=False, tail_window=(10, 40)) as w:
        w.log_measurement(1, 100, {"act": Spectrum(np.arange(1, 301, dtype=float) ** -1.0, n_rows=10_000, dim=300)})
        raise RuntimeError("preempted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = TailPredictor(0.5).fit([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert pred.excluded_["c"].endswith("; it failed (RuntimeError: preempted)"), pred.excluded_
    assert main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "note: run 'c': latest measurement is at progress 0.100 < 0.2; it failed (RuntimeError: preempted); " \
           "left out" in out, out


# ---- 2: "extras": null ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("other_key", [False, True])
def test_extras_null_reads_as_empty_everywhere(tmp_path, capsys, other_key):
    """``"extras": null`` alone was refused (RecordFormatError: "RunInfo.extras must be a dict"); beside an unknown
    top-level key (kept in extras) the reader took it, and resume, the failure mark and update_info raised
    AttributeError ('NoneType' object has no attribute 'get')."""
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=1000), fsync=False) as w:
        w.log(1, 400, val_loss=3.0)
    header = json.loads((path / "run.json").read_text())
    header["extras"] = None
    if other_key:
        header["host"] = "node-1"
    (path / "run.json").write_text(json.dumps(header))
    want = {"host": "node-1"} if other_key else {}
    assert RunRecord.open(path).info.extras == want
    assert main(["inspect", str(path)]) == 0 and "status: ends at 40% of budget" in capsys.readouterr().out
    with pytest.raises(ZeroDivisionError), RunWriter(path, resume=True, fsync=False) as w:
        assert w.info.extras == want
        w.log(2, 500, val_loss=2.9)
        raise ZeroDivisionError("boom")
    assert _extras(path) == {"status": "failed", "failure": "ZeroDivisionError: boom"}
    r = RunRecord.open(path)
    assert failure(r) == "failed (ZeroDivisionError: boom)" and run_status(r) == "failed (ZeroDivisionError) at 50% of budget"
    header = json.loads((path / "run.json").read_text())
    header["extras"] = None
    (path / "run.json").write_text(json.dumps(header))
    with RunWriter(path, resume=True, fsync=False) as w:
        w.update_info(status="complete")
    assert _extras(path) == {"status": "complete"}


# ---- 4: a writer on a run that had ended ----------------------------------------------------------------------


def test_a_script_over_a_finished_runs_checkpoints_that_crashes_does_not_mark_the_run_failed(tmp_path):
    """The training logged its whole budget and closed cleanly (no status); a measuring script resumed the record
    and crashed: the run read "failed (...) at 100% of budget"."""
    path = tmp_path / "r"
    _run(tmp_path, "r", [4.0, 3.5, 3.2, 3.0], 4)
    with pytest.raises(MemoryError), RunWriter(path, resume=True, fsync=False) as w:
        w.log_measurement(2, 200, {"act": Spectrum(np.arange(1, 301, dtype=float) ** -1.2, n_rows=10_000, dim=300)})
        raise MemoryError("measuring checkpoint 3")
    assert _extras(path) == {"failure_after_end": "MemoryError: measuring checkpoint 3"}  # before: status failed
    r = RunRecord.open(path)
    assert failure(r) is None and ended(r) and run_status(r) == "complete"
    # a run marked complete keeps its status, and gets no "failure" key (before: "failure" beside "complete")
    with pytest.raises(OSError), RunWriter(path, resume=True, fsync=False) as w:
        assert w.info.extras.keys() == {"failure_history"}  # the resume withdrew the earlier failure_after_end
        w.update_info(status="complete")  # (review 23: into failure_history)
        raise OSError("disk full")
    assert _extras(path).items() >= {"status": "complete", "failure_after_end": "OSError: disk full"}.items()
    with RunWriter(path, resume=True, fsync=False):  # a clean re-run of the script leaves no mark
        pass
    assert _extras(path).keys() == {"status", "failure_history"} and _extras(path)["status"] == "complete"


def test_a_writer_on_a_run_short_of_its_budget_still_marks_it_failed(tmp_path):
    """The rule reads only the lines recorded before the writer opened: a resumed training that crashes past 95%
    is failed (its records reach 95% only by its own lines), and so is one resumed from a checkpoint before 95%
    (drop_after) on a record that had reached it."""
    path = tmp_path / "r"
    _run(tmp_path, "r", [4.0, 3.5], 10)  # 20%
    with pytest.raises(RuntimeError), RunWriter(path, resume=True, fsync=False) as w:
        for i in range(3, 11):
            w.log(i, i * 100, val_loss=3.0)
        raise RuntimeError("crash at 100%")
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: crash at 100%"}
    with pytest.raises(RuntimeError), RunWriter(path, resume=True, fsync=False) as w:  # the record reached 100%
        w.drop_after(5)  # training resumes from the checkpoint at step 5 (60%)
        w.log(6, 700, val_loss=2.9)
        raise RuntimeError("crash again")
    assert _extras(path).items() >= {"status": "failed", "failure": "RuntimeError: crash again"}.items()
