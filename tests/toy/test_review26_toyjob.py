"""Review (session 26, toyjob) of the README main job (``examples/toy``, ``examples/replicate``): the machine a run
trained on is recorded in its run.json; the toy report reads the preset's fraction, leaves diverged runs out of the
matched-loss table, and keeps Fig. 4a's tier labels apart; verdict.json is strict JSON; a job takes its lock before
it reads or writes preset.json; a stray FloatingPointError is not passed off as a one-line input error."""
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from examples.replicate import pipeline
from examples.replicate.machine import cpu_model, machine_info
from examples.toy import report
from spectral_lens import Spectrum
from spectral_lens.analysis import TailPredictor, token_inefficiency
from spectral_lens.records import RunInfo, RunWriter, open_runs

FRACTIONS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0)


def _spectrum(alpha):
    return Spectrum(values=torch.tensor([r ** -alpha for r in range(1, 65)], dtype=torch.float64), n_rows=500, dim=64)


def _write(root, tier, *, slow, alpha0, slope, nan_from=None, family="Muon"):
    """A hand-written run (no training): alpha_tail linear in progress, val loss 4 - 3 f / slow, and H_S =
    progress (so a probe row says which checkpoint it read); from progress ``nan_from`` on its losses are NaN
    and it is marked diverged (as ToyWorkload.run does)."""
    path = root / f"{family.lower()}-b{tier}"
    info = RunInfo(path.name, family=family, batch_tier=tier, total_tokens=1000, n_layer=2,
                   primary_spectrum="act:blocks.1")
    with RunWriter(path, info, tail_window=(10, 40), fsync=False) as w:
        for i, f in enumerate(FRACTIONS):
            if nan_from is not None and f >= nan_from:
                w.log(i, int(1000 * f), val_loss=math.nan, train_loss=math.nan)
                w.update_info(status="diverged", divergence=f"toy: validation loss nan at step {i}")
                break
            w.log_measurement(i, int(1000 * f), {"act:blocks.1": _spectrum(alpha0 + slope * f)},
                              val_loss=4.0 - 3.0 * f / slow, progress=f,
                              scalars={"H_S": f, "H_peak": 0.5, "pc1_peak": 0.5})
        else:
            w.update_info(status="complete")
    return path


def _no_nan(text):
    raise ValueError(f"not strict JSON: {text}")


# ------------------------------------------------------------------------------------------ the machine


def test_cpu_model_reads_proc_cpuinfo_text():
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n"
    assert cpu_model(text) == "AMD EPYC 7B13"


def test_a_measured_run_records_its_machine_and_the_readers_accept_it(tmp_path, capsys):
    # the committed run's last checkpoint moved with the CI machine's CPU (Intel -> AMD) and nothing said so
    from examples.toy.presets import PRESETS, REFERENCE_LRS
    from examples.toy.workload import ToyWorkload
    from spectral_lens.cli import main as cli

    run_dir = ToyWorkload(PRESETS["smoke"]).run("Muon", 64, REFERENCE_LRS["Muon"], tmp_path / "muon-b64")
    extras = json.loads((run_dir / "run.json").read_text())["extras"]
    m = extras["machine"]
    assert m == json.loads(json.dumps(machine_info()))  # the machine (and threads) it trained with
    assert m["cpu"] == cpu_model() and m["torch"] == torch.__version__ and m["threads"] == torch.get_num_threads()
    assert {"machine", "os", "python", "blas", "cpu_capability", "env"} <= set(m)
    assert extras["status"] == "complete"
    run, = open_runs([run_dir])
    assert run.info.extras["machine"]["cpu"] == m["cpu"]
    assert cli(["inspect", str(run_dir)]) == 0


# ------------------------------------------------------------------------------------------ the report


def _sections(tmp_path, monkeypatch, wl, runs):
    monkeypatch.setattr(report, "_save", lambda fig, path: path)  # figures built, not written
    return report.toy_sections(wl, runs, tmp_path)


def test_our_numbers_and_the_probe_rows_use_the_presets_fraction(tmp_path, monkeypatch):
    # the table said "Muon rho at 20%" and the probes read the 20% checkpoint whatever the preset's fraction
    # examples to target 200, 250, 300, 500; B = 128's alpha falls past the others': rho 0.4 at 20%, -0.2 at 30%
    runs = open_runs([_write(tmp_path, t, slow=s, alpha0=a, slope=k)
                      for t, s, a, k in ((16, 0.3, 1.0, 0.0), (32, 0.35, 1.1, 0.0), (64, 0.45, 1.2, 0.0),
                                         (128, 0.6, 1.25, -1.0))])
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.3)
    text = "\n".join(_sections(tmp_path, monkeypatch, wl, runs))
    eps = token_inefficiency(runs, 2.0)
    rho = {f: TailPredictor(f, window=(10, 40)).fit(runs).score(targets=eps).within["Muon"] for f in (0.2, 0.3)}
    assert rho[0.2].rho == pytest.approx(0.4) and rho[0.3].rho == pytest.approx(-0.2)
    assert f"Muon rho at 30% = {report._num(rho[0.3].rho)} (n = {rho[0.3].n})" in text
    assert "rho at 20%" not in text
    assert "(first / 30% / last checkpoint)" in text
    assert "| Muon | 16 | 0.000 / 0.300 / 1.000 |" in text  # H_S = progress: the 30% checkpoint was read


def test_a_fraction_off_the_scan_grid_gets_its_own_column(tmp_path, monkeypatch):
    runs = open_runs([_write(tmp_path, t, slow=s, alpha0=a, slope=k)
                      for t, s, a, k in ((16, 1.0, 1.2, 2.0), (32, 1.3, 1.5, -1.0), (64, 1.8, 1.1, 3.0))])
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.22)
    text = "\n".join(_sections(tmp_path, monkeypatch, wl, runs))
    assert "| 20% | 22% | 25% |" in text and "Muon rho at 22% = n/a" not in text


def test_the_matched_loss_table_leaves_out_a_run_that_diverged_after_reaching_the_target(tmp_path, monkeypatch):
    # B = 16 reaches loss 2.0 at 50% and diverges at 100%: its pre-divergence checkpoint was a row of Fig. 11a's
    # table and of its rho(tier, alpha), while the verdict's rho and Fig. 4a leave every diverged run out
    dirs = [_write(tmp_path, 16, slow=0.6, alpha0=1.2, slope=1.0, nan_from=0.9),
            _write(tmp_path, 32, slow=1.3, alpha0=1.5, slope=1.0), _write(tmp_path, 64, slow=1.4, alpha0=1.7, slope=1.0),
            _write(tmp_path, 128, slow=1.45, alpha0=1.8, slope=1.0)]
    runs = open_runs(dirs)
    assert [row[0] for row in report._matched(runs, "Muon", 2.0, (10, 40))] == [32, 64, 128]
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.2)
    text = "\n".join(_sections(tmp_path, monkeypatch, wl, runs))
    fig11a = text.split("(Fig. 11a analogue)", 1)[1].split("\n## ", 1)[0]
    assert "| 16 |" not in fig11a and "| 32 |" in fig11a and "(n = 3)" in fig11a
    assert "Left out (diverged, even after reaching the target" in fig11a and "B=16" in fig11a


def _label_boxes(points):
    """The window boxes of Fig. 4a's tier labels for these scatter points (the figure built, not saved)."""
    figs = {}

    def keep(fig, path):
        figs[path.name] = fig
        return path
    import matplotlib
    matplotlib.use("Agg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_save", keep)
        report._figures([], ("Muon",), 2.0, (10, 40), {"Muon": {0.2: 0.5}}, [], [], Path("unused"), {"Muon": points}, 0.2)
    fig = figs["toy_fig4a.png"]
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    texts = [t for t in fig.axes[1].texts if t.get_text().startswith("B=")]
    return {t.get_text(): t.get_window_extent(renderer) for t in texts}, fig.bbox


@pytest.mark.filterwarnings("ignore:No artists with labels")  # Fig. 4b of no runs: an empty legend
@pytest.mark.parametrize("points", [
    [(1.70, 5632.0, 64), (1.70, 5632.0, 128)],  # coincident
    [(1.700, 5632.0, 64), (1.702, 5632.0, 128), (1.80, 8192.0, 512), (1.60, 5600.0, 32)],  # nearly, among others
    [(1.70, 5632.0, 64), (1.70, 5632.0, 128), (1.70, 5632.0, 256)],  # three at one point
])
def test_fig4a_tier_labels_do_not_overlap_when_points_coincide(points):
    pytest.importorskip("matplotlib")
    boxes, figure = _label_boxes(points)
    assert sorted(boxes) == sorted(f"B={t}" for *_, t in points)
    for name, box in boxes.items():  # inside the figure (the rightmost point's label was cut off at its edge)
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and box.y1 <= figure.y1, (name, box, figure)
    names = sorted(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), (a, b, boxes[a], boxes[b])


# ------------------------------------------------------------------------------------------ verdict.json


def test_verdict_json_is_strict_json_with_null_for_nan(tmp_path, monkeypatch):
    # two tiers: rho is NaN (too few to rank) and there is no noise-scale baseline; json.dumps wrote bare NaN
    from support.figures import save_figures_unrendered

    dirs = [_write(tmp_path / "runs", 16, slow=1.0, alpha0=1.2, slope=1.0),
            _write(tmp_path / "runs", 32, slow=1.3, alpha0=1.5, slope=1.0)]
    wl = SimpleNamespace(name="fake", unit="examples", families=("Muon",), tiers=(16, 32), reference_tier=16,
                         target_loss=2.0, budget=1000, fraction=0.2, window=(10, 40))
    lrs = {("Muon", 16): {"lr": 0.1}, ("Muon", 32): {"lr": 0.2}}
    monkeypatch.setattr(pipeline, "choose_rates", lambda *a, **k: lrs)
    monkeypatch.setattr(pipeline, "train_runs", lambda *a, **k: dirs)
    save_figures_unrendered(monkeypatch)
    v = pipeline._replicate(wl, tmp_path, pipeline.TunerSettings(rungs=(16, 32)), False)
    assert math.isnan(v.families["Muon"].rho) and math.isnan(v.families["Muon"].baseline_rho)
    saved = json.loads((tmp_path / "report" / "verdict.json").read_text(), parse_constant=_no_nan)
    fam = saved["families"]["Muon"]
    assert fam["rho"] is None and fam["pvalue"] is None and fam["baseline_rho"] is None
    assert saved["pooled_rho"] is None and saved["target"] == 2.0 and fam["reached"] == {"16": 1000.0, "32": 1000.0}


# ------------------------------------------------------------------------------------------ the CLI


def test_two_jobs_started_at_once_with_different_presets_do_not_both_run(tmp_path, monkeypatch, capsys):
    # job A found no preset.json and was about to write its own when job B (another preset) started: B found
    # no preset.json either, wrote its own and ran; A then wrote its own over it and ran too, into one --out.
    # B is started at the worst moment, from inside A's write of preset.json
    from examples.toy import __main__ as toy_main
    from examples.toy.presets import PRESETS
    from spectral_lens import atomic

    other = dataclasses.replace(PRESETS["smoke"], name="smoke-other", budget=2 * PRESETS["smoke"].budget)
    monkeypatch.setitem(toy_main.PRESETS, other.name, other)
    out = tmp_path / "toy"
    ran, statuses = [], []

    def fake_replicate(workload, out_dir, tuner, stream):
        ran.append((workload.name, json.loads((out_dir / "preset.json").read_text())["name"]))
    monkeypatch.setattr(pipeline, "_replicate", fake_replicate)
    real_write = atomic.write_text_atomic

    def write(path, text, *a, **k):
        if path.name == "preset.json" and not statuses:
            statuses.append(None)
            statuses.append(toy_main.main(["--preset", other.name, "--out", str(out)]))  # job B
        return real_write(path, text, *a, **k)
    monkeypatch.setattr(atomic, "write_text_atomic", write)
    assert toy_main.main(["--preset", "smoke", "--out", str(out)]) == 0  # job A
    assert statuses[1] == 2, ran
    assert "another replication is running into this directory" in capsys.readouterr().err
    assert ran == [("toy-smoke", "smoke")]
    assert json.loads((out / "preset.json").read_text())["name"] == "smoke"


def test_a_lock_file_left_by_a_job_killed_before_writing_preset_json_is_not_another_run(tmp_path, monkeypatch):
    from examples.replicate.settings import LOCK_FILE, holds_other_files
    from examples.toy import __main__ as toy_main

    out = tmp_path / "toy"
    out.mkdir()
    (out / LOCK_FILE).touch()  # the lock is now taken before preset.json is written
    assert not holds_other_files(out)
    monkeypatch.setattr(pipeline, "_replicate", lambda *a: None)
    assert toy_main.main(["--preset", "smoke", "--out", str(out)]) == 0
    assert (out / "preset.json").exists()


def test_a_stray_floating_point_error_is_not_reported_as_a_one_line_input_error(tmp_path, monkeypatch):
    # the CLI answered any FloatingPointError with status 2 and "(the run is not kept; finished runs are)": stale
    # since a measured run that diverges is kept as a result (ToyWorkload.run) and the tuner's trainable scores a
    # diverged trial NaN; none reaches the CLI, so one that does is a bug and keeps its traceback
    from examples.toy import __main__ as toy_main

    def boom(*a):
        raise FloatingPointError("toy: something non-finite")
    monkeypatch.setattr(pipeline, "_replicate", boom)
    with pytest.raises(FloatingPointError, match="something non-finite"):
        toy_main.main(["--preset", "smoke", "--out", str(tmp_path / "toy")])


def test_a_nan_validation_loss_at_an_evaluation_only_step_stops_the_run_as_diverged(tmp_path, monkeypatch):
    # at a measurement a NaN validation loss stopped the run (diverged, as documented), but at the evaluations
    # between measurements it was logged and training went on
    from examples.toy import measure
    from examples.toy.presets import PRESETS, REFERENCE_LRS
    from examples.toy.workload import ToyWorkload, step_at

    preset = PRESETS["smoke"]
    steps = preset.budget // 64
    measured = {step_at(f, steps) for f in preset.measure_fractions}
    evals = sorted({step_at(k * preset.eval_every, steps) for k in range(1, 11)} - measured)
    bad = evals[0]  # the first evaluation-only step: the first call of ToyLens.val_loss (measurements use measure)
    real = measure.ToyLens.val_loss
    calls = {"n": 0}

    def val_loss(self):
        calls["n"] += 1
        return math.nan if calls["n"] == 1 else real(self)
    monkeypatch.setattr(measure.ToyLens, "val_loss", val_loss)
    run_dir = ToyWorkload(preset).run("Muon", 64, REFERENCE_LRS["Muon"], tmp_path / "muon-b64")
    run, = open_runs([run_dir])
    assert run.info.extras["status"] == "diverged" and "validation loss nan" in run.info.extras["divergence"]
    assert max(e["step"] for e in run.events) == bad and max(m.step for m in run.measurements) < bad
