"""Review 24 (``audit-records``): the pure functions of the status lifecycle (``records/_status.py``) behind
the fixes of ``test_review24_records.py``: going on by a training line, the ``settled`` mark, the close of a
writer that resumed a failed run or found a ``"running"`` with nothing to restore."""

from __future__ import annotations

from spectral_lens.records._status import _closed, _is_training, _stale_running, _went_on, failure_history_lines


def test_went_on_pure():
    assert _went_on(800, 600, False, trained=True)  # a step trained again (RunWriter._retrained)
    assert not _went_on(800, 600, False, trained=False)
    assert _went_on(800, 900, False, trained=False) and _went_on(800, None, True, trained=False)
    assert _is_training({"train_loss": 1.0}) and _is_training({"tokens_per_s": 1.0, "lr": 0.1})
    assert not _is_training({"val_loss": 1.0, "train_loss": None}) and not _is_training({"lr": 1e-3})


def test_inspect_says_how_a_settled_entry_ended():
    extras = {"failure_history": [{"failure": "RuntimeError: x", "step": 8, "tokens": 800, "resumed": 1.0,
                                   "settled": "complete"},
                                  {"failure": "RuntimeError: y", "step": 9, "tokens": 900, "resumed": 2.0,
                                   "settled": None}]}
    assert failure_history_lines(extras) == [
        "failed (RuntimeError: x) at step 8, 800 tokens; resumed, then marked complete",
        "failed (RuntimeError: y) at step 9, 900 tokens; resumed, then its status was removed",
    ]


def test_a_settled_entry_is_no_gone_writers_mark():
    entry = {"failure": "x", "step": 1, "tokens": 1, "resumed": 1.0}
    assert _stale_running({"status": "running", "failure_history": [entry]}) == entry
    assert _stale_running({"status": "running", "failure_history": [{**entry, "settled": "complete"}]}) is None


def test_closed_pure():
    entry = {"failure": "x", "step": 1, "tokens": 1, "resumed": 1.0}
    running = {"status": "running", "failure_history": [entry]}
    # the writer's own "running": settled as before
    assert _closed(running, entry, went_on=True, said=False) == {"failure_history": [{**entry, "went_on": True}]}
    assert _closed(running, entry, went_on=False, said=False) == {"status": "failed", "failure": "x"}
    # the caller's status
    assert _closed({**running, "status": "complete"}, entry, went_on=False, said=True) == {
        "status": "complete", "failure_history": [{**entry, "settled": "complete"}]}
    assert _closed(running, entry, went_on=False, said=True) is None  # its "running": the resume's mark
    assert _closed({**running, "status": "failed", "failure": "y"}, entry, went_on=True, said=True) is None
    # a "running" with nothing to restore
    assert _closed({"status": "running", "lr": 1}, None, went_on=False, said=False) == {"lr": 1}
    assert _closed({"status": "running"}, None, went_on=True, said=True) is None
    assert _closed({"status": "complete"}, None, went_on=False, said=False) is None
