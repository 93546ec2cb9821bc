"""Review 27 (smalls): small defects other reviewers noticed and left alone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spectral_lens.records.reader import RunRecord
from spectral_lens.records.schema import RecordFormatError, RunInfo
from spectral_lens.records.writer import RunWriter


# --- 1. RunInfo refuses in memory what the run.json reader refuses -------------------------------------------

@pytest.mark.parametrize("key, value", [("n_layer", 12.0), ("n_layer", 12.5), ("n_layer", True), ("n_layer", "12"),
                                        ("seed", 3.0), ("seed", False), ("family", 3), ("primary_spectrum", 1.5)])
def test_runinfo_refuses_types_the_reader_refuses(key, value):
    with pytest.raises(TypeError, match=rf"RunInfo\.{key}.*{value!r}"):
        RunInfo("r", **{key: value})


def test_runinfo_type_refusals_match_the_reader(tmp_path):
    """Each refused value is one the reader refuses in run.json too (not a stricter rule)."""
    for key, value in [("n_layer", 12.0), ("seed", 3.0), ("family", 3)]:
        d = tmp_path / key
        with RunWriter(d, RunInfo("r")):
            pass
        data = json.loads((d / "run.json").read_text())
        data[key] = value
        (d / "run.json").write_text(json.dumps(data))
        with pytest.raises(RecordFormatError, match=key):
            RunRecord.open(d)


def test_runinfo_accepts_numpy_integers_and_writes_a_readable_run(tmp_path):
    info = RunInfo("r", n_layer=np.int64(24), seed=np.int32(7))
    with RunWriter(tmp_path / "r", info) as w:
        assert w.tail_window == (200, 400)
    run = RunRecord.open(tmp_path / "r")
    assert (run.info.n_layer, run.info.seed) == (24, 7)
