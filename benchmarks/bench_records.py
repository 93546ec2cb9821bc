"""Run records at a team's scale: reading a sweep, the early prediction, the report's alpha_tail
trajectories, and appending to / resuming a long run. Wall time and peak traced memory (tracemalloc,
a separate pass) per case, one thread.

The sweep is ``--runs`` run directories of ``--measurements`` lines with ``--layers`` activation
spectra of dimension ``--dim`` each, written with ``RunWriter`` (``fsync=False``); the long run has
``--long`` measurement lines (d = 64, no summaries) and as many events. Both are generated into
``--root`` unless they are there already (so a second call times the reads only).

    python benchmarks/bench_records.py --root /tmp/records                     # 40 x 300 x 3, d 4096 (1.3 GB)
    python benchmarks/bench_records.py --root /tmp/records --long 50000 --cases long
    python benchmarks/bench_records.py --quick                                 # smoke test, a temp dir
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectral_lens.analysis import TailPredictor, alpha_trajectory  # noqa: E402
from spectral_lens.atomic import write_json_atomic  # noqa: E402
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter, open_runs  # noqa: E402
from spectral_lens.spectrum import Spectrum  # noqa: E402

TOTAL = 10_000_000


def _spectrum(rng, d: int, alpha: float) -> Spectrum:
    v = np.sort(np.arange(1, d + 1, dtype=np.float64) ** -alpha * np.exp(rng.normal(0, 0.02, d)))[::-1].copy()
    return Spectrum(torch.from_numpy(v), n_rows=20_000, dim=d, source="bench")


def make_sweep(root: Path, runs: int, measurements: int, layers: int, dim: int) -> None:
    """``runs`` runs (5 tiers per family) of ``measurements`` lines with ``layers`` spectra each."""
    rng = np.random.default_rng(0)
    for i in range(runs):
        tier = 2 ** (i % 5)
        info = RunInfo(f"run{i:03d}", family=f"fam{i // 5}", batch_tier=tier, tokens_per_step=1000 * tier,
                       n_layer=12, total_tokens=TOTAL, batch_size=8 * tier,
                       primary_spectrum=f"act:blocks.{layers - 1}")
        steps = TOTAL // (1000 * tier)
        with RunWriter(root / info.run_id, info, fsync=False) as w:
            for k in range(measurements):
                step = (k + 1) * steps // measurements - 1
                tokens = (step + 1) * 1000 * tier
                loss = 2.0 + 3.0 * math.exp(-3 * tokens / TOTAL) / (1 + 0.1 * tier) + rng.normal(0, 0.01)
                w.log(step, tokens, train_loss=loss + 0.05, tokens_per_s=1e5 * tier ** 0.5)
                specs = {f"act:blocks.{layer}": _spectrum(rng, dim, 1.0 + 0.1 * layer + 0.3 * tokens / TOTAL + 0.01 * tier)
                         for layer in range(layers)}
                w.log_measurement(step, tokens, specs, val_loss=loss, scalars={"noise_scale": 50.0})


def make_long(path: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    info = RunInfo("long", family="L", batch_tier=1, n_layer=12, total_tokens=n * 100, primary_spectrum="act")
    with RunWriter(path, info, fsync=False) as w:
        for k in range(n):
            w.log(k, (k + 1) * 100, train_loss=3.0, tokens_per_s=1e5)
            w.log_measurement(k, (k + 1) * 100, {"act": _spectrum(rng, 64, 1.0)}, val_loss=3.0, summarize=False)


def measure(fn, repeats: int = 1) -> dict:
    """Best wall time of ``repeats`` calls, then the peak traced memory of one more call."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"s": round(min(times), 4), "peak_MB": round(peak / 2**20, 1)}


def append_ms(path: Path, n: int = 200) -> float:
    """Milliseconds per ``log_measurement`` (d = 64, no summaries) appended to the run at ``path``; the
    lines are dropped again afterwards."""
    spec = Spectrum(np.arange(64, 0, -1.0), n_rows=100, dim=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        w = RunWriter(path, resume=True, fsync=False)
    try:
        first = 10**9
        t = time.perf_counter()
        for k in range(n):
            w.log_measurement(first + k, 10**9, {"act": spec}, summarize=False)
        ms = (time.perf_counter() - t) / n * 1e3
        w.drop_after(first - 1)
    finally:
        w.close()
    return round(ms, 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="where the synthetic runs live (default: a temporary directory)")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--measurements", type=int, default=300)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--long", type=int, default=50_000, help="measurement lines of the long run")
    ap.add_argument("--cases", nargs="+", default=["sweep", "long"], choices=["sweep", "long"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.measurements, args.layers, args.dim, args.long = 5, 12, 2, 256, 200
    torch.set_num_threads(1)
    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory()
        args.root = Path(tmp.name)
    res: dict = {"sizes": {"runs": args.runs, "measurements": args.measurements, "layers": args.layers,
                           "dim": args.dim, "long": args.long}}
    try:
        if "sweep" in args.cases:
            sweep = args.root / "sweep"
            if not sweep.exists():
                t = time.perf_counter()
                make_sweep(sweep, args.runs, args.measurements, args.layers, args.dim)
                res["sweep_generate_s"] = round(time.perf_counter() - t, 2)
            res["open_runs"] = measure(lambda: open_runs([sweep]))
            runs = open_runs([sweep])
            res["tail_predictor_fit"] = measure(lambda: TailPredictor().fit(open_runs([sweep])))
            res["alpha_trajectories"] = measure(lambda: [alpha_trajectory(r) for r in open_runs([sweep])])
            res["early_alpha_run0"] = float(TailPredictor().fit(runs).statistics_[0].value)
        if "long" in args.cases:
            long = args.root / "long"
            if not long.exists():
                t = time.perf_counter()
                make_long(long, args.long)
                res["long_generate_s"] = round(time.perf_counter() - t, 2)
            res["long_open"] = measure(lambda: RunRecord.open(long))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RecordWarning)
                w = RunWriter(long, resume=True, fsync=False)
            try:
                # cold: the writer parses the whole file on its first call; it then reads only what was appended
                res["long_measured_steps"] = measure(lambda: (w._scans.clear(), w.measured_steps()))
                res["long_measured_steps_again"] = measure(w.measured_steps)
            finally:
                w.close()
            res["long_resume"] = measure(lambda: RunWriter(long, resume=True, fsync=False).close())
            res["append_ms_at_long"] = append_ms(long)
            fresh = args.root / "fresh"
            if not fresh.exists():
                make_long(fresh, 10)
            res["append_ms_at_10_lines"] = append_ms(fresh)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(res, indent=2))
    if args.out is not None:
        write_json_atomic(args.out, res)
    return res


if __name__ == "__main__":
    main()
