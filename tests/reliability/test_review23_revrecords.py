"""Review 23 (adversarial review of the failed-run lifecycle, ``audit-records``): a failed run resumed.

* A run that failed past 95% of its budget, resumed, and failing again read as ``failure_after_end`` (the
  record "ended": its lines before the writer opened reach 95%), because the resume had set the status to
  ``"running"`` and ``_mark_failed`` only took ``"failed"`` as "not ended"; the close then restored the old
  failure (the new one beside it as ``failure_after_end``), or, when the training went on, removed the status:
  a resumed training that crashed at 98% read as ``complete``.
* A ``failure_history`` that is not a list (``null`` from another tool, a hand-edited value): the resume
  dropped the withdrawn failure (and a ``failure_after_end``) from ``run.json`` without adding it anywhere;
  once the training went on it was lost.
* ``inspect`` printed a history entry's multi-line failure text across lines.
"""

from __future__ import annotations

import json

import pytest
import torch

import spectral_lens as sl
from spectral_lens.analysis import failure
from spectral_lens.cli import main
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.report import run_status


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _history(path):
    return [{k: v for k, v in e.items() if k not in ("resumed", "went_on")} for e in _extras(path).get("failure_history", [])]


def _fail(path, tokens, text, *, info=None):
    """A ``with RunWriter`` block (resumed when ``info`` is None) that logs at ``tokens`` and raises."""
    with pytest.raises(RuntimeError), RunWriter(path, info, resume=info is None, fsync=False) as w:
        if tokens is not None:
            w.log(tokens // 100, tokens, train_loss=1.0)
        raise RuntimeError(text)


@pytest.mark.parametrize("goes_on", [False, True])
def test_a_run_failed_past_95_percent_resumed_that_fails_again_is_failed_with_the_new_failure(tmp_path, goes_on):
    path = tmp_path / "r"
    _fail(path, 9700, "first", info=RunInfo("r", total_tokens=10_000))
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: first"}  # the writer's own lines: failed
    _fail(path, 9800 if goes_on else None, "second")
    extras = _extras(path)
    # before: {"status": "failed", "failure": first, "failure_after_end": second} (without going on), or
    # {"failure_after_end": second} (going on: the run read as complete, the crash at 98% as no failure)
    assert extras["status"] == "failed" and extras["failure"] == "RuntimeError: second"
    assert "failure_after_end" not in extras
    assert _history(path) == [{"failure": "RuntimeError: first", "step": 97, "tokens": 9700}]
    r = RunRecord.open(path)
    assert failure(r) == "failed (RuntimeError: second)" and run_status(r).startswith("failed (RuntimeError) at 9")


def test_a_finished_run_resumed_to_measure_that_fails_still_records_failure_after_end(tmp_path):
    """The rule the fix keeps: a record that says it ended (here by its lines) takes a later failure as
    ``failure_after_end``; only a failed run this writer resumed is not "ended" by its lines."""
    path = tmp_path / "e"
    with RunWriter(path, RunInfo("e", total_tokens=10_000), fsync=False) as w:
        w.log(97, 9700, train_loss=1.0)
    _fail(path, None, "measuring")
    assert _extras(path) == {"failure_after_end": "RuntimeError: measuring"}


@pytest.mark.parametrize("history", [None, 5, "x", {"a": 1}])
def test_a_failure_history_that_is_not_a_list_loses_no_failure(tmp_path, history):
    path = tmp_path / "h"
    _fail(path, 400, "first", info=RunInfo("h", total_tokens=10_000, extras={"failure_history": history}))
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(5, 500, train_loss=1.0)
    extras = _extras(path)
    assert "status" not in extras and "failure" not in extras
    entries = extras["failure_history"]  # before: the history as it was, and the failure gone from run.json
    assert isinstance(entries, list) and entries[-1]["failure"] == "RuntimeError: first"
    assert entries[:-1] == ([] if history is None else [history])  # nothing of the old value lost either
    assert main(["inspect", str(path)]) == 0


def test_a_failure_history_null_resumed_without_going_on_is_restored(tmp_path):
    path = tmp_path / "n"
    _fail(path, 400, "first", info=RunInfo("n", total_tokens=10_000, extras={"failure_history": None}))
    with RunWriter(path, resume=True, fsync=False):
        assert _extras(path)["failure_history"][0]["failure"] == "RuntimeError: first"  # while open, too
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: first"}


def test_inspect_shows_a_multi_line_failure_of_the_history_on_one_line(tmp_path, capsys):
    path = tmp_path / "i"
    history = [{"failure": "A\nB  C", "step": 1, "tokens": 100}, {"failure": "x" * 500}]
    with RunWriter(path, RunInfo("i", total_tokens=10_000, extras={"failure_history": history}), fsync=False) as w:
        w.log(1, 100, train_loss=1.0)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    earlier = [ln for ln in out if ln.startswith("  earlier: ")]
    assert earlier[0] == "  earlier: failed (A B C) at step 1, 100 tokens; resumed"  # before: "(A" then "B  C) ..."
    assert len(earlier) == 2 and len(earlier[1]) < 260 and not any(ln.startswith("B") for ln in out)


def test_the_settle_keeps_the_tokens_per_step_the_callbacks_driver_wrote(tmp_path):
    """The driver rewrites run.json's tokens_per_step while the writer is open; the resume's settle at close
    rewrites run.json again: it reads the file as it is then, so neither undoes the other."""
    path = tmp_path / "run"
    _fail(path, 96, "first", info=RunInfo("r", batch_tier=1, total_tokens=10_000))
    w = RunWriter(path, resume=True, fsync=False, tail_window=None)
    lens = sl.SpectralLens(torch.nn.Sequential(torch.nn.Linear(4, 4)), [torch.randn(3, 4)], writer=w, params=(),
                           layers=["0"], progress=False)
    LensDriver(lens, [], tokens_per_step=48).record_train_loss(3, 1.5)  # tokens 144: past the failure's 96
    w.close()
    header = json.loads((path / "run.json").read_text())
    assert header["tokens_per_step"] == 48 and "status" not in header["extras"]
    assert _history(path) == [{"failure": "RuntimeError: first", "step": 0, "tokens": 96}]
