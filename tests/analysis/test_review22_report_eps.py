"""The report's runs table and ``predict`` name an unknown ``eps_tok`` alike."""
from __future__ import annotations

from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import open_runs
from spectral_lens.report import build_report


def test_the_runs_table_says_unknown_for_a_run_still_going(tmp_path):
    """A run cut short at ~50% above the target: its eps_tok is NaN (unknown: it may still reach it). The
    table printed "–" (as for no value at all) where ``predict`` prints "unknown"."""
    write_theorem6_sweep(tmp_path / "sw", (2, 4, 8), family="g", n_measure=20, n_eval=100)
    run = tmp_path / "sw" / "g-b8"
    for name in ("log.jsonl", "measurements.jsonl"):
        lines = (run / name).read_text().splitlines()
        (run / name).write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    build_report(open_runs([tmp_path / "sw"]), tmp_path / "rep", target_loss=2.9, plots=False)
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "rep" / "report.md").read_text().splitlines()
            if line.startswith("| g-b")}
    assert "not reached yet" in rows["g-b8"] and "| unknown |" in rows["g-b8"]
    assert "| 1.000 |" in rows["g-b4"]
