"""``benchmarks/bench_records.py --quick``: the records benchmark runs end to end on tiny sizes."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_records_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_records")
    try:
        res = bench.main(["--quick", "--root", str(tmp_path), "--out", str(tmp_path / "res.json")])
    finally:
        sys.modules.pop("bench_records", None)
    assert json.loads((tmp_path / "res.json").read_text()) == res
    assert res["sizes"] == {"runs": 5, "measurements": 12, "layers": 2, "dim": 256, "long": 200}
    for case in ("open_runs", "tail_predictor_fit", "alpha_trajectories", "long_open", "long_measured_steps",
                 "long_resume"):
        assert math.isfinite(res[case]["s"]) and res[case]["peak_MB"] > 0, case
    assert res["append_ms_at_long"] > 0 and res["append_ms_at_10_lines"] > 0
    assert 1.0 < res["early_alpha_run0"] < 1.5  # run000 (tier 1), deepest layer at 20%: 1.1 + 0.3 * 0.2 + 0.01, jittered
    # the appended lines were dropped again: the long run still has its 200 measurements
    long = tmp_path / "long" / "measurements.jsonl"
    assert len(long.read_bytes().splitlines()) == 200
