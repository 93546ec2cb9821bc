"""Review 27 (jobs): a pre-registered fraction within 0.05% of a scanned one (0.2004 beside 0.2) got a second,
identical ``20%`` column in the toy report's rho-by-progress table (and the verdict said its rho was "at 20%"
beside a scanned "20%" of another rho): labels of distinct fractions are now distinct, and a fraction that only
rounds to a grid point (0.1 + 0.2) is that grid point's one column."""
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

from examples.replicate.verdict import percent, verdict
from examples.toy import report
from spectral_lens.records import open_runs

_path = Path(__file__).parents[1] / "replicate" / "test_review26_revjobsig.py"
_spec = importlib.util.spec_from_file_location("_revjobsig", _path)
_revjobsig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_revjobsig)
VALS = (4.0, 3.0, 2.5, 2.3, 2.2, 2.1, 2.05)


def test_percent_tells_close_fractions_apart():
    assert percent(0.2) == "20%" and percent(0.125) == "12.5%"  # unchanged where nothing is close
    assert percent(0.2004, [0.1, 0.2, 0.2004]) == "20.04%" and percent(0.2, [0.2, 0.2004]) == "20%"
    assert percent(0.1 + 0.2, [0.3]) == "30%"  # one fraction, not 30.000000000000004%


def _header(fraction, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_save", lambda fig, path: path)
    runs = open_runs([_revjobsig._run(tmp_path, t, VALS) for t in (16, 32, 64)])
    wl = SimpleNamespace(target_loss=2.2, window=(10, 40), families=("Muon",), fraction=fraction)
    text = "\n".join(report.toy_sections(wl, runs, tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("| family | 5%"))
    return [c.strip() for c in header.strip("|").split("|")][1:], text, runs


def test_the_toy_rho_table_has_one_column_per_label(tmp_path, monkeypatch):
    labels, text, runs = _header(0.2004, tmp_path, monkeypatch)
    assert len(labels) == len(set(labels)) and "20%" in labels and "20.04%" in labels, labels
    assert "Muon rho at 20.04% =" in text
    v = verdict(runs, target=2.2, families=("Muon",), unit="examples", fraction=0.2004, window=(10, 40))
    assert "at 20.04% of the budget" in v.lines[0] and re.search(r"\b20%: ", v.lines[2]), v.lines


def test_a_fraction_rounding_to_a_grid_point_is_one_column(tmp_path, monkeypatch):
    labels, _, _ = _header(0.1 + 0.2, tmp_path, monkeypatch)
    assert labels.count("30%") == 1 and len(labels) == len(set(labels)) == 8, labels
