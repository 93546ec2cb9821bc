"""``benchmarks/gpu_all.py --tiny``: the one-command GPU benchmark runs end to end on the CPU."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_all_tiny_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_all = importlib.import_module("gpu_all")
    out = tmp_path / "all.json"
    res = gpu_all.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and not list(tmp_path.glob("*.tmp"))
    keys = ["probe_vs_nograd", "probe_chunked_head_vs_nograd", "recipe_vmap_over_probe"]
    if importlib.util.find_spec("opacus") is not None:  # the optional peer
        keys.append("opacus_over_probe")
    for s in res["gradients"]:
        for key in keys:
            assert math.isfinite(s[key]) and s[key] > 0, key
    assert res["accuracy"]["exact"]["alpha_abs_err"][0] < 1e-3
    assert res["pool"]["exact_vs_bare"] > 0 and res["pool"]["rows"] == 16 * 64
    assert res["head_loss"]["ours_chunked_grad_rel_err_vs_materialized"] < 1e-5
    assert {r["d"] for r in res["small_chunk"]} == {32}
    assert [r["d"] for r in res["fast_variants"]] == [64] and res["fast_variants"][0]["best_vs_gemm"] > 0
    for s in res["gradients"]:  # the cast cache's comparison row and the op counts
        assert math.isfinite(s["probe_no_cast_cache_vs_nograd"])
        assert set(s["ops"]) == {"nograd", "probe", "probe_no_cast_cache"}
    sys.modules.pop("gpu_all", None)
