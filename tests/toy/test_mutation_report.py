"""Mutation audit (report.py, Fig. 11a analogue): the matched-loss row is the FIRST checkpoint with val loss
at or below the target, and its alpha is that checkpoint's tail exponent (exact power laws, known by hand).
Written because mutants taking ``< target`` or the last such checkpoint passed tests/toy/test_report.py."""
import pytest
import torch

from examples.toy.report import _matched
from spectral_lens import Spectrum
from spectral_lens.records import RunInfo, RunWriter, open_runs

LOSSES = (4.0, 3.0, 2.5, 2.0, 1.5, 1.0)  # checkpoint 3 is exactly at the target 2.0


def _write(root, tier, shift):
    path = root / f"a-b{tier}"
    with RunWriter(path, RunInfo(path.name, family="A", batch_tier=tier, total_tokens=600, n_layer=2,
                                 primary_spectrum="act:blocks.1"), tail_window=(10, 40), fsync=False) as w:
        for i, loss in enumerate(LOSSES[shift:] + (0.5,) * shift):
            a = 1.0 + 0.1 * i  # an exact power law r^-a: its alpha over any window is a
            spec = Spectrum(values=torch.tensor([r ** -a for r in range(1, 65)], dtype=torch.float64), n_rows=500, dim=64)
            w.log_measurement(i, 100 * i, {"act:blocks.1": spec}, val_loss=loss, progress=i / 5)
    return path


def test_matched_row_is_the_first_checkpoint_at_or_below_the_target(tmp_path):
    runs = open_runs([_write(tmp_path, 32, 0), _write(tmp_path, 64, 1)])
    rows = _matched(runs, "A", 2.0, (10, 40))
    assert [(t, n, v) for t, n, v, *_ in rows] == [(32, 300, 2.0), (64, 200, 2.0)]
    assert rows[0][3] == pytest.approx(1.3, abs=1e-9) and rows[1][3] == pytest.approx(1.2, abs=1e-9)
