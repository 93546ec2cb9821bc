"""Review 24 (``audit-rev-records``): an adversary of the ``audit-records`` change (``docs/records.md``, "Failed
runs": a resumed writer that logs a line of training at a step the record held one at went on).

* The record's training steps were read from every line with an integer ``step`` and a training key, also lines
  ``RunRecord.open`` refuses (another tool's: float or missing ``tokens``). ``trainer_state.log_history`` reads the
  record with the reader, so it does not see those lines and backfills ``train_loss`` at their steps: the
  backfill counted as going on, and the script measuring the failed run's checkpoints cleared its failure.
  Only the lines the reader keeps count now (as for the 95% end, ``RunWriter._ended_before``).
* A backfilled ``train_loss`` at a step where the record held only ``tokens_per_s`` (a loop that logs its
  throughput, its losses backfilled from ``log_history``) counted as training that step again. ``log_history``
  never writes a ``train_loss`` where the record holds one, and writes no ``tokens_per_s``: a ``train_loss`` now
  trains a step again only where the record held a ``train_loss``; a ``tokens_per_s`` (measured only while
  training) where it held either.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from spectral_lens.integrations.trainer_state import log_history
from spectral_lens.records import RunInfo, RunWriter
from spectral_lens.records._status import _trains_again

TOTAL = 10_000


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _failed(path, lines):
    """A run that logged ``lines`` (``(step, scalars)`` at ``100 * step`` tokens) and failed."""
    with contextlib.suppress(RuntimeError), RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
        for step, scalars in lines:
            w.log(step, 100 * step, **scalars)
        raise RuntimeError("preempted")


def _state(tmp_path, steps, step=4):
    """A checkpoint whose ``trainer_state.json`` holds a loss and a learning rate at ``steps``."""
    ckpt = tmp_path / "hf" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "num_input_tokens_seen": 100 * step,
        "log_history": [{"loss": 1.0 + s / 10, "learning_rate": 1e-3, "step": s, "num_input_tokens_seen": 100 * s}
                        for s in steps]}))
    return ckpt


def _backfill(path, ckpt):
    """The checkpoints guide's script, measuring nothing new: the curves backfilled, the writer closed."""
    writer = RunWriter(path, resume=True, fsync=False)
    try:
        return log_history(writer, ckpt)
    finally:
        writer.close()


@pytest.mark.filterwarnings("ignore::spectral_lens.records.RecordWarning")  # the reader skipping the line
@pytest.mark.parametrize("line", [{"step": 3, "tokens": 300.0, "train_loss": 1.3},  # float tokens
                                  {"step": 3, "train_loss": 1.3},  # no tokens
                                  {"step": 3, "tokens": 300, "train_loss": "1.3"}])  # a string loss
def test_a_backfill_over_a_line_the_reader_refuses_is_no_going_on(tmp_path, line):
    """Another tool's line at step 3 that ``RunRecord.open`` refuses: ``log_history`` (which reads the record
    with ``errors="skip"``) backfills step 3's loss, before the record's end (step 6). The failure is restored
    at the close. Before, the refused line made step 3 "held", and the backfill went on (status removed)."""
    path = tmp_path / "r"
    _failed(path, [(1, {"train_loss": 1.1}), (6, {"val_loss": 2.0})])
    lines = (path / "log.jsonl").read_text().splitlines(keepends=True)
    (path / "log.jsonl").write_text("".join([lines[0], json.dumps(line) + "\n", *lines[1:]]))  # before the end
    assert _backfill(path, _state(tmp_path, [1, 2, 3, 4])) == 4  # lr at 1, loss and lr at 2, 3, 4
    extras = _extras(path)
    assert extras.get("status") == "failed" and extras.get("failure") == "RuntimeError: preempted", extras
    assert "failure_history" not in extras, extras


def test_a_backfilled_loss_where_the_record_held_only_throughput_is_no_going_on(tmp_path):
    """A loop logging its throughput (``tokens_per_s`` alone) failed at step 6; the checkpoints guide's script
    backfills the losses from ``log_history`` at steps 1 to 4, where the record held the throughput only: no
    step was trained again, and the failure is restored. Before, the backfilled ``train_loss`` at a step with a
    ``tokens_per_s`` line counted as training it again."""
    path = tmp_path / "r"
    _failed(path, [(s, {"tokens_per_s": 5e5}) for s in range(1, 7)])
    assert _backfill(path, _state(tmp_path, [1, 2, 3, 4])) == 4
    assert _extras(path).get("status") == "failed", _extras(path)


@pytest.mark.parametrize("held, again", [({"train_loss": 1.0}, {"train_loss": 1.2}),
                                         ({"train_loss": 1.0}, {"tokens_per_s": 5e5}),
                                         ({"tokens_per_s": 5e5}, {"tokens_per_s": 4e5}),
                                         ({"train_loss": 1.0, "tokens_per_s": 5e5}, {"train_loss": 1.2})])
def test_a_restart_from_an_earlier_checkpoint_still_goes_on(tmp_path, held, again):
    """The case the change is for, kept: a restart from the checkpoint at step 4 without ``drop_after`` logs
    training at steps 5 and 6, which the record held, before its end (step 8): it went on (status removed)."""
    path = tmp_path / "r"
    _failed(path, [(s, held) for s in range(1, 9)])
    with RunWriter(path, resume=True, fsync=False) as w:
        for s in (5, 6):
            w.log(s, 100 * s, **again)
    extras = _extras(path)
    assert "status" not in extras and extras["failure_history"][-1].get("went_on") is True, extras


def test_a_tokens_per_s_line_at_a_step_the_record_lacked_is_no_going_on(tmp_path):
    """The other side of the throughput rule: a ``tokens_per_s`` at a step the record held no training line
    at, before its end, trains no step again (as a ``train_loss`` there)."""
    path = tmp_path / "r"
    _failed(path, [(2, {"train_loss": 1.0}), (8, {"train_loss": 1.0})])
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(5, 500, tokens_per_s=5e5)
    assert _extras(path).get("status") == "failed", _extras(path)


def test_trains_again_pure():
    """The rule alone: a ``train_loss`` against a held ``train_loss``; a ``tokens_per_s`` against any held line."""
    held = {1: True, 2: False}
    assert _trains_again({"train_loss": 1.0}, 1, held) and not _trains_again({"train_loss": 1.0}, 2, held)
    assert _trains_again({"tokens_per_s": 1.0}, 2, held) and _trains_again({"tokens_per_s": 1.0}, 1, held)
    assert not _trains_again({"train_loss": 1.0, "tokens_per_s": 1.0}, 3, held)
    assert not _trains_again({"train_loss": None, "tokens_per_s": None}, 1, held)
