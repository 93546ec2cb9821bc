"""Review (session 25, revtoy) of the toy job's diverged runs and of the toy report's Fig. 4a, on hand-written
records (no training): the scatter plots the values the verdict's rho ranks, at the preset's fraction; a run
that diverged is never the report's "best" run; the verdict says which diverged tiers rho leaves out."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from examples.replicate import verdict as verdict_mod
from examples.replicate.pipeline import chain_transitions
from examples.toy import report
from spectral_lens import Spectrum
from spectral_lens.records import RunInfo, RunWriter, open_runs

FRACTIONS = (0.0, 0.1, 0.25, 0.3, 0.5, 1.0)  # no measurement at 20%: the nearest one (25%) is not rho's value


def _spectrum(alpha):
    return Spectrum(values=torch.tensor([r ** -alpha for r in range(1, 65)], dtype=torch.float64), n_rows=500, dim=64)


def _write(root, tier, *, slow, alpha0, slope, fractions=FRACTIONS, nan_from=None, family="Muon"):
    """A run whose alpha_tail moves linearly with progress and whose val loss falls as 4 - 3 f / slow; from
    progress ``nan_from`` on its losses are NaN and it is marked diverged (as ToyWorkload.run does)."""
    path = root / f"{family.lower()}-b{tier}"
    info = RunInfo(path.name, family=family, batch_tier=tier, total_tokens=1000, n_layer=2,
                   primary_spectrum="act:blocks.1")
    with RunWriter(path, info, tail_window=(10, 40), fsync=False) as w:
        for i, f in enumerate(fractions):
            if nan_from is not None and f >= nan_from:
                w.log(i, int(1000 * f), val_loss=math.nan, train_loss=math.nan)
                w.update_info(status="diverged", divergence=f"toy: validation loss nan at step {i}")
                break
            w.log_measurement(i, int(1000 * f), {"act:blocks.1": _spectrum(alpha0 + slope * f)},
                              val_loss=4.0 - 3.0 * f / slow, progress=f, scalars={"H_S": 0.1 * tier, "H_peak": 0.5,
                                                                                  "pc1_peak": 0.5})
        else:
            w.update_info(status="complete")
    return path


def _captured_fig4a(monkeypatch, wl, runs, tmp_path):
    """The Fig. 4a figure toy_sections builds (captured, not rendered)."""
    figs = {}

    def keep(fig, path):
        figs[path.name] = fig
        return path
    monkeypatch.setattr(report, "_save", keep)
    report.toy_sections(wl, runs, tmp_path)
    return figs["toy_fig4a.png"]


def _plotted_x(fig):
    """The x values of the scatter (every point: one whose y is NaN, a tier that never reached the target, is
    masked by matplotlib, not dropped)."""
    return sorted(float(x) for x in np.ma.getdata(fig.axes[1].collections[0].get_offsets())[:, 0])


def _verdict_statistics(monkeypatch, runs, wl):
    """The early alpha_tail values the verdict's rho ranked (the verdict's own TailPredictor, recorded)."""
    used = []

    class Recording(verdict_mod.TailPredictor):
        def fit(self, runs):
            out = super().fit(runs)
            used.append((self.fraction, {s.run_id: s.value for s in self.statistics_}))
            return out
    monkeypatch.setattr(verdict_mod, "TailPredictor", Recording)
    v = verdict_mod.verdict(runs, target=wl.target_loss, families=wl.families, unit="examples",
                            fraction=wl.fraction, window=wl.window, fractions=())
    assert used[0][0] == wl.fraction  # the first fit is the pre-registered rho's
    return v, used[0][1]


@pytest.mark.parametrize("fraction, fractions", [
    (0.2, FRACTIONS),  # 20% falls between measurements: the figure took the nearest (25%), rho interpolates
    (0.35, (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)),  # a preset fraction other than 20%: the figure read 20% regardless
])
def test_fig4a_plots_the_alpha_values_the_verdicts_rho_ranks_at_the_presets_fraction(tmp_path, monkeypatch,
                                                                                      fraction, fractions):
    runs = open_runs([_write(tmp_path, t, slow=s, alpha0=a, slope=k, fractions=fractions)
                      for t, s, a, k in ((16, 1.0, 1.2, 2.0), (32, 1.3, 1.5, -1.0), (64, 1.8, 1.1, 3.0))])
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=fraction)
    _, used = _verdict_statistics(monkeypatch, runs, wl)
    fig = _captured_fig4a(monkeypatch, wl, runs, tmp_path)
    plotted = _plotted_x(fig)
    assert len(used) == 3
    assert plotted == pytest.approx(sorted(used.values()), rel=1e-12, abs=0)
    assert f"alpha at {fraction:.0%}" in fig.axes[1].get_xlabel()


def test_fig4a_and_the_probes_leave_out_a_run_that_diverged_after_reaching_the_target(tmp_path, monkeypatch):
    # B = 16 reaches loss 2.0 first (at 50%) and then diverges: its examples-to-target stand, but the library
    # leaves every diverged run out of the ranking, so it is not in rho, not in the figure, and not the
    # "most token-efficient" run whose late checkpoints the Fourier probes read (its last one is before 100%)
    dirs = [_write(tmp_path, 16, slow=0.6, alpha0=1.2, slope=1.0, nan_from=0.9),
            _write(tmp_path, 32, slow=1.3, alpha0=1.5, slope=1.0), _write(tmp_path, 64, slow=1.4, alpha0=1.7, slope=1.0),
            _write(tmp_path, 128, slow=1.45, alpha0=1.8, slope=1.0)]
    runs = open_runs(dirs)
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.2)
    _, used = _verdict_statistics(monkeypatch, runs, wl)
    assert set(used) == {"muon-b32", "muon-b64", "muon-b128"}
    assert report._best_run(runs, "Muon", 2.0).run_id == "muon-b32"
    text = "\n".join(report.toy_sections(wl, runs, tmp_path))
    assert "| Muon | 32 |" in text and "| Muon | 16 |" not in text  # the Fourier probe table's row
    fig = _captured_fig4a(monkeypatch, wl, runs, tmp_path)
    assert _plotted_x(fig) == pytest.approx(
        sorted(used.values()), rel=1e-12, abs=0)
    # the taxonomy's chain step is represented by the same run
    other = _write(tmp_path, 32, slow=1.0, alpha0=1.5, slope=1.0, family="Untied")
    assert chain_transitions(open_runs(dirs + [other]), ["Muon", "Untied"], 2.0) == [("muon-b32", "untied-b32")]


def test_the_verdict_names_a_tier_that_diverged_after_reaching_the_target_and_leaves_it_out_of_rho(tmp_path):
    # it reached the target, so it is in `reached` with its examples; rho leaves it out (n = 3 of 4 tiers that
    # reached), which the verdict line said nothing about, and it counted towards "three tiers reached"
    dirs = [_write(tmp_path, 16, slow=0.6, alpha0=1.2, slope=1.0, nan_from=0.9),
            _write(tmp_path, 32, slow=1.3, alpha0=1.5, slope=1.0), _write(tmp_path, 64, slow=1.4, alpha0=1.7, slope=1.0),
            _write(tmp_path, 128, slow=5.0, alpha0=1.8, slope=1.0, nan_from=0.6)]  # never reaches it: diverged
    v = verdict_mod.verdict(open_runs(dirs), target=2.0, families=("Muon",), unit="examples", fraction=0.2,
                            window=(10, 40), fractions=())
    fam = v.families["Muon"]
    assert set(fam.reached) == {16, 32, 64} and fam.reached[16] == 500.0 and fam.missed == (128,)
    assert fam.diverged == (16, 128) and fam.n == 2
    line = next(x for x in v.lines if x.startswith("Muon:"))
    assert "3 of 4 tiers reached the target (not: 128 (diverged)) (16 diverged after reaching it)" in line
    assert "diverged tiers are left out of rho" in line
    assert "underpowered" in fam.flags  # two tiers reached the target and are ranked


def test_a_rerun_keeps_a_diverged_run_and_its_note_says_so(tmp_path):
    # a diverged run is a finished result: the rerun trains nothing, and its "already complete" note said nothing
    # of the divergence (the run's own progress line, "diverged", was printed only by the call that trained it)
    import io
    import json

    from examples.replicate.runs import train_runs

    class Diverging:
        name, unit, families, tiers, reference_tier, target_loss, budget = "fake", "examples", ("A",), (1, 2), 1, 1.0, 10

        def __init__(self):
            self.calls = []

        def run(self, family, tier, lrs, run_dir):
            self.calls.append(tier)
            run_dir.mkdir(parents=True)
            extras = {"lrs": lrs, "status": "diverged" if tier == 2 else "complete"}
            (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "extras": extras}))
            for name in ("log.jsonl", "measurements.jsonl"):
                (run_dir / name).write_text("")
            return run_dir
    lrs = {("A", 1): {"lr": 0.1}, ("A", 2): {"lr": 0.2}}
    first, log = Diverging(), io.StringIO()
    train_runs(first, lrs, tmp_path, stream=log)
    assert first.calls == [1, 2] and "a-b2 diverged (lrs lr=0.2)" in log.getvalue()
    again, log = Diverging(), io.StringIO()
    train_runs(again, lrs, tmp_path, stream=log)
    assert again.calls == []
    assert "2 of 2 runs already complete; training 0 x 10 examples (kept as diverged: a-b2)" in log.getvalue()


def test_a_diverged_status_survives_the_writers_close_and_inspect_and_predict_show_it(tmp_path, capsys):
    # ToyWorkload.run says update_info(status="diverged") inside its `with RunWriter(...)` block and leaves it
    # cleanly: the writer's close must keep the status, and the CLI must read the run as diverged
    from spectral_lens.cli import main as cli

    dirs = [_write(tmp_path, 16, slow=0.6, alpha0=1.2, slope=1.0, nan_from=0.9),
            _write(tmp_path, 32, slow=1.3, alpha0=1.5, slope=1.0), _write(tmp_path, 64, slow=1.4, alpha0=1.7, slope=1.0)]
    run, = open_runs([dirs[0]])
    assert run.info.extras["status"] == "diverged"
    assert cli(["inspect", str(dirs[0])]) == 0
    assert "status: diverged: val_loss nan at step 5" in capsys.readouterr().out
    assert cli(["predict", str(tmp_path), "--target-loss", "2.0", "--window", "10", "40"]) == 0
    out = capsys.readouterr()
    assert "muon-b16' (tier 16) diverged" in out.out + out.err and "left out of the rankings and scores" in out.out + out.err


def test_the_eta_after_a_run_that_diverged_early_counts_only_what_it_trained(tmp_path, monkeypatch):
    # a run that diverged after 1 of its 10 examples was counted as 10 examples done, in the time 1 took: the
    # ETA then promised the next run in a tenth of its time. Clock: 1 s per example trained
    import io
    import json

    from examples.replicate import progress as progress_mod
    from examples.replicate.runs import train_runs

    clock = {"t": 0.0}
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(monotonic=lambda: clock["t"]))

    class Workload:
        name, unit, families, tiers, reference_tier, target_loss, budget = "fake", "examples", ("A",), (1, 2), 1, 1.0, 10

        def run(self, family, tier, lrs, run_dir):
            seen = 1 if tier == 1 else 10  # tier 1 diverges at its first example
            clock["t"] += seen
            run_dir.mkdir(parents=True)
            status = "diverged" if tier == 1 else "complete"
            (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "extras": {"lrs": lrs, "status": status}}))
            (run_dir / "log.jsonl").write_text("".join(json.dumps({"step": s, "tokens": s, "train_loss": 1.0}) + "\n"
                                                       for s in range(seen + 1)))
            (run_dir / "measurements.jsonl").write_text("")
            return run_dir
    log = io.StringIO()
    train_runs(Workload(), {("A", 1): {"lr": 0.1}, ("A", 2): {"lr": 0.2}}, tmp_path, stream=log)
    first = next(x for x in log.getvalue().splitlines() if "a-b1 diverged" in x)
    assert "ETA 0m10s" in first  # 10 examples left at 1 example/s (was "ETA 0m01s")
    assert "100.0%" in log.getvalue().splitlines()[-1]
