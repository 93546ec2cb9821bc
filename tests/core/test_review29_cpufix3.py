"""Review 29 (cpufix3): ``bench_covariance.small_chunk`` (issue 13's CPU ratio in one process) times the fast
precision beside the exact one and records the OpenMP wait policy its ratios were measured under."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench_covariance(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_covariance")


def test_small_chunk_rows_name_precision_and_wait_policy(monkeypatch):
    """fp32 rows in every precision, bf16 rows in the first; each row says which, and the wait policy as
    the environment has it ("default" when unset: libgomp's spinning waits)."""
    bc = _bench_covariance(monkeypatch)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    rows = bc.small_chunk(dims=(16,), rows=32, pairs=2, per=1)
    assert [(r["dtype"], r["precision"]) for r in rows] == [
        ("float32", "exact"), ("float32", "fast"), ("bfloat16", "exact")]
    assert {r["omp_wait_policy"] for r in rows} == {"default"}
    for r in rows:
        assert 0 < r["wall_ratio_min"] <= r["wall_ratio_median"] <= r["wall_ratio_max"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    rows = bc.small_chunk(dims=(16,), rows=32, pairs=1, per=1, dtypes=(torch.float32,), precisions=("fast",))
    assert [(r["dtype"], r["precision"], r["omp_wait_policy"]) for r in rows] == [("float32", "fast", "PASSIVE")]

