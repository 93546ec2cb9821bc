"""Review 24 (rev-cli): an adversarial review of the merged 'audit-cli' change. Its refusal of a
``tokens_per_step`` / ``batch_size`` of 0 broke the library's own synthetic writer (a step of fewer tokens than
a sequence has 0 whole sequences) and made every run.json an older version wrote with such a 0 unreadable,
the whole run with it."""

from __future__ import annotations

import json

import pytest
from support.cli import run_cli

_SMALL = dict(dim=64, grad_dim=32, n_measure=4, n_eval=8, total_tokens=100_000, tail_window=(4, 16))


def test_synthetic_sweep_with_a_step_shorter_than_a_sequence(tmp_path):
    """Was ``ValueError: RunInfo.batch_size must be positive, got 0``: ``tps // seq_len`` of a 512-token step."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import open_runs

    paths = write_theorem6_sweep(tmp_path, (0.5, 1), family="f", tokens_per_tier=1024, **_SMALL)
    half, one = open_runs(paths)
    assert (half.info.tokens_per_step, half.info.batch_size) == (512, 0.5)  # samples per step, as the unit says
    assert (one.info.tokens_per_step, one.info.batch_size) == (1024, 1)  # whole sequences: as before


@pytest.mark.parametrize("field", ["tokens_per_step", "batch_size"])
def test_zero_count_of_an_older_run_json_reads_as_unknown(tmp_path, field):
    """A run.json with ``batch_size`` 0 (``write_theorem6_sweep`` wrote one until this review) or
    ``tokens_per_step`` 0 (``RunInfo`` took it before 'audit-cli') was refused, the whole run with it:
    ``inspect RUN`` said nothing but the error. Now the field reads as unknown (``None``) with a warning
    naming the file and field; a negative one is still refused."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import RecordFormatError, RecordWarning, RunRecord

    run, = write_theorem6_sweep(tmp_path, (1,), family="f", **_SMALL)
    run_json = run / "run.json"
    header = json.loads(run_json.read_text())
    header[field] = 0
    run_json.write_text(json.dumps(header))
    with pytest.warns(RecordWarning, match=rf"{run_json}: run metadata field '{field}' is 0: read as unknown"):
        rec = RunRecord.open(run)
    assert getattr(rec.info, field) is None and len(rec.measurements) == 4
    status, out, err = run_cli(["inspect", run])
    assert status == 0 and "f-b1" in out, err
    assert err == [(f"spectral-lens inspect: warning: {run_json}: run metadata field '{field}' is 0: read as unknown "
                    "(null; a run.json of an older version, whose RunInfo took a 0)")], err
    header[field] = -1
    run_json.write_text(json.dumps(header))
    with pytest.raises(RecordFormatError, match=f"'{field}' must be a positive number, got -1"):
        RunRecord.open(run)


@pytest.mark.parametrize("fraction, text", [(9999.99999999999, "1e+06%"), (-9999.99999999999, "-1e+06%"),
                                            (1e4, "1e+06%"), (9999.99, "999999%"), (0.2, "20%")])
def test_percent_at_the_g_form_switch(fraction, text):
    """A share that rounds to 1e6% printed ``1000000%`` (whole below 1e6 before rounding), 1e6% ``1e+06%``."""
    from spectral_lens.analysis.efficiency import percent

    assert percent(fraction) == text


@pytest.mark.parametrize("field", ["batch_tier", "tokens_per_step", "total_tokens", "batch_size"])
@pytest.mark.parametrize("value", [False, True, "8"])
def test_runinfo_refuses_what_its_reader_refuses(tmp_path, field, value):
    """``RunInfo(tokens_per_step=False)`` (a 0 the new positivity check let through: it skipped bools) and
    ``batch_size=True`` or ``"8"`` were written to a run.json that the reader then refused as the wrong type."""
    import numpy as np

    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    with pytest.raises(TypeError, match=rf"RunInfo\.{field} must be a number, got {value!r}"):
        RunInfo("r", **{field: value})
    info = RunInfo("r", **{field: np.float64(8)})  # a NumPy number is one: written and read back as 8
    with RunWriter(tmp_path / "r", info, fsync=False):
        pass
    assert getattr(RunRecord.open(tmp_path / "r").info, field) == 8


def test_transition_whose_only_known_reading_is_a_run_with_itself():
    """``c:d:c:d`` with a run ``c:d`` said "no ':' in it splits it into two run ids of these runs": it does, into
    one run twice, refused as ``--transition a:a`` is."""
    from spectral_lens.cli import _split_transition

    with pytest.raises(ValueError, match=r"--transition 'c:d:c:d' names run 'c:d' twice: a transition must name two "
                                         r"different runs"):
        _split_transition("c:d:c:d", {"c:d", "x"})
    assert _split_transition("c:d:c:d", {"c:d", "c", "d:c:d"}) == ("c", "d:c:d")  # a pair of two: that one
