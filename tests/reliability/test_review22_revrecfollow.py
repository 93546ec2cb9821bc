"""Review 22, review of the recfollow change: a failing ``with RunWriter`` block on a run whose record had ended
records ``failure_after_end`` and keeps the status, so the analyses do not see the failure. That is only right
when the analyses see the run as ended too: the writer must count the lines the reader counts. And the check
runs while the block's exception is being handled: it must stay cheap on a long record."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.analysis import coverage, ended, failure
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter

TOTAL = 1_000_000


def _open_skip(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        return RunRecord.open(path, errors="skip")


def _half_run(path, n=5):
    """A training record that ended at 50% of its budget (a log event and a measurement per step)."""
    spec = Spectrum(torch.linspace(2.0, 0.1, 16, dtype=torch.float64), n_rows=32, dim=16)
    with RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
        for i in range(1, n + 1):
            w.log(i, i * TOTAL // (2 * n), train_loss=3.0)
        w.log_measurement(n, TOTAL // 2, {"act": spec}, val_loss=3.0)


def _fail_in_block(path):
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        with RunWriter(path, resume=True, fsync=False):
            raise RuntimeError("boom")


@pytest.mark.parametrize("file, line", [
    ("log.jsonl", {"step": 99, "tokens": 990_000.0, "train_loss": 2.0}),  # float tokens: the reader refuses it
    ("log.jsonl", {"step": 99, "tokens": 990_000, "train_loss": "2.0"}),  # a loss that is not a number
    ("log.jsonl", {"tokens": 990_000}),  # no step
    ("log.jsonl", {"step": 99, "tokens": 10 ** 400}),  # beyond the float range: before, OverflowError lost the mark
    ("measurements.jsonl", {"step": 99, "tokens": 990_000, "spectra": {"act": {"file": "spectra/gone.npz"}}}),
    ("measurements.jsonl", {"step": 99, "tokens": 990_000, "val_loss": "low"}),
])
def test_a_line_the_reader_refuses_does_not_make_the_writer_keep_the_status(tmp_path, file, line):
    """Before: any JSON line with a number ``tokens`` at 95% made the block's exception ``failure_after_end``;
    the reader skips that line, so the run read as neither ended nor failed ("not reached yet")."""
    path = tmp_path / "r"
    _half_run(path)
    with open(path / file, "ab") as fh:  # another tool's line
        fh.write(json.dumps(line).encode() + b"\n")
    _fail_in_block(path)
    run = _open_skip(path)
    assert not ended(run) and coverage(run) == 0.5
    assert run.info.extras.get("status") == "failed" and "failure_after_end" not in run.info.extras
    assert failure(run) == "failed (RuntimeError: boom)"


@pytest.mark.parametrize("file", ["log.jsonl", "measurements.jsonl"])
def test_a_line_the_reader_counts_still_keeps_the_status(tmp_path, file):
    path = tmp_path / "r"
    _half_run(path)
    line = {"step": 99, "tokens": 960_000, "train_loss": 2.0} if file == "log.jsonl" else \
        {"step": 99, "tokens": 960_000, "val_loss": 2.0, "spectra": {}}
    with open(path / file, "ab") as fh:
        fh.write(json.dumps(line, indent=None, separators=(", ", " : ")).encode() + b"\n")  # spaced as another tool
    _fail_in_block(path)
    run = _open_skip(path)
    assert ended(run) and run.info.extras.get("failure_after_end") == "RuntimeError: boom"
    assert failure(run) is None


def _random_line(rng, i):
    tokens = rng.choice([i * 10_000, 950_000 + rng.randrange(50_000), 949_999, float(960_000), "960000", True,
                         10 ** 400, -960_000, None])
    obj = {"step": rng.choice([i, i, i, None, 1.5]), "tokens": tokens}
    if rng.random() < 0.3:
        obj["train_loss"] = rng.choice([2.0, "x", None, 10 ** 400])
    if rng.random() < 0.2:
        obj["scalars"] = {"tokens": 990_000}  # a nested "tokens" is not the line's
    text = json.dumps(obj, separators=rng.choice([(",", ":"), (", ", ": ")]))
    return rng.choice([text, text, text, text[: len(text) // 2], "[1, 2]", "{\"step\": 3, \"tokens\": 97000"])


@pytest.mark.parametrize("seed", range(12))
def test_the_writers_ended_before_agrees_with_the_readers_coverage(tmp_path, seed):
    """Random log lines (some refused by the reader, some at 95%, a nested "tokens"): the writer's check says
    what the analysis says."""
    rng = random.Random(seed)
    agree = []
    for k in range(8):
        path = tmp_path / f"r{k}"
        with RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
            w.log(0, 0, train_loss=3.0)
        with open(path / "log.jsonl", "ab") as fh:
            fh.write("\n".join(_random_line(rng, i) for i in range(1, rng.randrange(2, 8))).encode() + b"\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordWarning)
            w = RunWriter(path, resume=True, fsync=False)
        try:
            mine = w._ended_before(RunRecord._read_header(path))
        finally:
            w.close()
        theirs = coverage(_open_skip(path)) >= 0.95
        agree.append((mine, theirs, (path / "log.jsonl").read_text()))
    assert all(mine == theirs for mine, theirs, _ in agree), [a for a in agree if a[0] != a[1]]
