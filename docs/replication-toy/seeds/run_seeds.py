"""Follow-up to the toy cpu run: is its shortfall (Muon rho 0.67 against the pre-registered 0.8) within
seed-to-seed variation?

Pre-registered (this file was committed before any of these runs started):

* Design: the whole cpu pipeline (tuner, five runs, report) once per seed 1, 2 and 3, everything
  else exactly the ``cpu`` preset. Seed 0 is the committed main run (docs/replication-toy/verdict.txt).
  The seed sets every run's initialization and data order, the tuner's trials included, so each seed
  is what a user with another seed would get from the README's main command.
* Primary: the Muon rho at 20% per seed (the pre-registered main statistic) and its median over the
  four seeds 0-3. The claim is called *supported across seeds* when that median is >= 0.8, else *not
  supported across seeds*. The main job's own verdict (seed 0) does not change either way.
* Secondary: rho between the per-tier means over the four seeds of the early alpha_tail (ranks 10-40
  at 20%) and of the examples-to-target (less quantized than one seed's validation grid); and the
  noise-scale baseline's rho per seed.
* Reported in full whatever comes out, in docs/replication-toy.md.

Run from the repository root: ``PYTHONPATH=. python docs/replication-toy/seeds/run_seeds.py OUT``
(about 5-6 min per seed on 2 idle cores; resumable, as the main command). ``OUT/seed<s>`` holds each
seed's pipeline output; ``OUT/summary.json`` and the printed table the results.
"""
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import examples.toy.__main__ as toy_main
from examples.toy.presets import PRESETS
from spectral_lens.atomic import write_text_atomic

SEEDS = (1, 2, 3)
MAIN_RUN = Path(__file__).resolve().parents[1] / "verdict.txt"  # seed 0, for the table


def _early_alphas(run_dir: Path) -> dict[int, float]:
    from spectral_lens.analysis import TailPredictor
    from spectral_lens.records import open_runs

    runs = open_runs(sorted(str(p) for p in (run_dir / "runs").iterdir() if p.is_dir()))
    stats = TailPredictor(0.2, window=(10, 40)).fit(runs).statistics_
    return {int(e.tier): float(e.value) for e in stats if e.family == "Muon"}


def main(out: Path, seed0: Path | None) -> int:
    base = PRESETS["cpu"]
    rows = {}
    for s in SEEDS:
        preset = dataclasses.replace(base, name=f"cpu-seed{s}", seed=s)
        toy_main.PRESETS[preset.name] = preset
        status = toy_main.main(["--preset", preset.name, "--out", str(out / f"seed{s}")])
        if status != 0:
            return status
    dirs = {s: out / f"seed{s}" for s in SEEDS}
    if seed0 is not None:
        dirs = {0: seed0, **dirs}
    for s, d in sorted(dirs.items()):
        v = json.loads((d / "report" / "verdict.json").read_text())["families"]["Muon"]
        nan = lambda x: math.nan if x is None else x  # noqa: E731  verdict.json writes NaN as null
        rows[s] = {"rho": nan(v["rho"]), "pvalue": nan(v["pvalue"]), "baseline_rho": nan(v["baseline_rho"]),
                   "reached": {int(k): x for k, x in v["reached"].items()}, "missed": v["missed"],
                   "rho_by_fraction": v["rho_by_fraction"], "alpha": _early_alphas(d)}
    rhos = [r["rho"] for r in rows.values()]
    median = statistics.median(rhos)
    tiers = sorted(next(iter(rows.values()))["alpha"])
    mean_alpha = {t: statistics.fmean(r["alpha"][t] for r in rows.values()) for t in tiers}
    mean_eps = {t: statistics.fmean(r["reached"].get(t, math.inf) for r in rows.values()) for t in tiers}
    from spectral_lens.analysis.spearman import spearman  # the verdict's test (exact p for small n)

    rho_m, p_m = spearman([mean_alpha[t] for t in tiers], [mean_eps[t] for t in tiers])
    summary = {"seeds": sorted(rows), "per_seed": rows, "median_rho": median,
               "verdict": "supported across seeds" if median >= 0.8 - 1e-9 else "not supported across seeds",
               "mean_alpha": mean_alpha, "mean_examples_to_target": mean_eps,
               "rho_of_means": rho_m, "pvalue_of_means": p_m}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print("seed  rho@20%  p      baseline  examples-to-target by tier")
    for s, r in sorted(rows.items()):
        eps = ", ".join(f"{t}: {r['reached'].get(t, 'missed')}" for t in tiers)
        print(f"{s:>4}  {r['rho']:7.2f}  {r['pvalue']:.3f}  {r['baseline_rho']:8.2f}  {eps}")
    print(f"median rho over seeds {sorted(rows)}: {median:.2f} -> {summary['verdict']}")
    print(f"rho of the per-tier means (alpha vs examples): {summary['rho_of_means']:.2f} (p = {summary['pvalue_of_means']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
