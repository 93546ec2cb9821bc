"""``RunWriter.fill_tokens_per_step``: the callbacks' driver rewrote ``run.json`` with the records' private helpers;
the writer now does it (one atomic rewrite, the lock held, other changes to run.json kept)."""

from __future__ import annotations

import json

import pytest

from spectral_lens.records import RunInfo, RunRecord, RunWriter


def _header(path):
    return json.loads((path / "run.json").read_text())


def test_fill_tokens_per_step_records_a_missing_value_and_keeps_a_recorded_one(tmp_path):
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r"), fsync=False) as w:
        w.update_info(status="running")
        w.fill_tokens_per_step(64)
        assert w.info.tokens_per_step == 64 and _header(path)["tokens_per_step"] == 64
        assert _header(path)["extras"] == {"status": "running"}  # the rest of run.json as it was
        w.fill_tokens_per_step(128)  # recorded: kept
        assert w.info.tokens_per_step == 64 and _header(path)["tokens_per_step"] == 64
    assert RunRecord.open(path).info.tokens_per_step == 64
    with RunWriter(tmp_path / "s", RunInfo("s", tokens_per_step=32), fsync=False) as w:
        w.fill_tokens_per_step(64)
        assert _header(tmp_path / "s")["tokens_per_step"] == 32


@pytest.mark.parametrize("bad", [0, -4, True, 1.5, "64"])
def test_fill_tokens_per_step_refuses_what_is_no_positive_integer(tmp_path, bad):
    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False) as w:
        with pytest.raises((ValueError, TypeError), match="fill_tokens_per_step"):
            w.fill_tokens_per_step(bad)
        assert w.info.tokens_per_step is None and _header(tmp_path / "r").get("tokens_per_step") is None


def test_a_closed_writer_refuses_fill_tokens_per_step(tmp_path):
    w = RunWriter(tmp_path / "r", RunInfo("r"), fsync=False)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.fill_tokens_per_step(64)
    assert _header(tmp_path / "r").get("tokens_per_step") is None
