"""Adversarial review (session 26, revtoyjob) of review 26's main-job changes (``examples/toy``, ``examples/replicate``):
the job lock between two real processes (a killed holder's lock is released by the kernel; the lock is held for the
whole job), a run stopped by a NaN validation loss at an evaluation-only step kept as diverged by a rerun, the toy
report's numbers against a float64 hand computation, Fig. 4a's tier labels inside the axes, and the machine record
on machines without ``/proc/cpuinfo``'s ``model name`` (macOS, ARM Linux)."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from examples.replicate import machine, pipeline
from examples.replicate.settings import LOCK_FILE
from examples.toy import report
from spectral_lens import Spectrum
from spectral_lens.records import RunInfo, RunWriter, open_runs

# a second process that holds OUT's job lock the way job_lock does (an exclusive flock on OUT/.replicate.lock)
# until it is killed; it prints "held" once it has it (python only: no torch import, so it starts at once)
_HOLDER = ("import fcntl, os, sys, time\n"
           "os.makedirs(sys.argv[1], exist_ok=True)\n"
           "fd = os.open(os.path.join(sys.argv[1], '.replicate.lock'), os.O_RDWR | os.O_CREAT, 0o644)\n"
           "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
           "print('held', flush=True)\n"
           "time.sleep(120)\n")
# a second process that tries the lock once: exit 0 when it got it, 1 when another holds it
_TRY = ("import fcntl, os, sys\n"
        "fd = os.open(os.path.join(sys.argv[1], '.replicate.lock'), os.O_RDWR | os.O_CREAT, 0o644)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(1)\n")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock")


# ------------------------------------------------------------------------------------------ the job lock


def test_a_job_killed_holding_the_lock_leaves_no_stale_lock_and_its_directory_is_resumed(tmp_path, monkeypatch, capsys):
    # job A (another process) took the lock of a new --out and was killed before it wrote preset.json: while it
    # runs a second job is refused in one line and writes nothing; once it is killed (SIGKILL: no cleanup runs)
    # the kernel has released its flock, and the --out holding only the lock file is taken as a fresh one
    from examples.toy import __main__ as toy_main

    out = tmp_path / "toy"
    ran = []
    monkeypatch.setattr(pipeline, "_replicate", lambda wl, o, tuner, stream: ran.append(wl.name))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert toy_main.main(["--preset", "smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "another replication is running into this directory" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE] and ran == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        holder.stdout.close()
    assert toy_main.main(["--preset", "smoke", "--out", str(out)]) == 0
    assert ran == ["toy-smoke"] and json.loads((out / "preset.json").read_text())["name"] == "smoke"


def test_the_lock_is_held_by_the_job_from_preset_json_to_its_end_against_another_process(tmp_path, monkeypatch):
    from examples.toy import __main__ as toy_main

    out = tmp_path / "toy"
    seen = []

    def fake(wl, o, tuner, stream):  # the whole pipeline runs inside: another process cannot take the lock
        assert (o / "preset.json").exists()
        seen.append(subprocess.run([sys.executable, "-c", _TRY, str(o)], timeout=60).returncode)
    monkeypatch.setattr(pipeline, "_replicate", fake)
    assert toy_main.main(["--preset", "smoke", "--out", str(out)]) == 0
    assert seen == [1]
    assert subprocess.run([sys.executable, "-c", _TRY, str(out)], timeout=60).returncode == 0  # released at the end


# ------------------------------------------------------------------------------------------ a NaN at an evaluation


def test_a_run_stopped_by_a_nan_evaluation_is_kept_as_diverged_by_a_rerun(tmp_path, monkeypatch):
    # item 8 stops a run at a NaN validation loss between measurements: the rerun must keep that record (a
    # finished result, not retrained into the same NaN forever), and the verdict must call the tier diverged
    from examples.replicate.runs import train_runs
    from examples.replicate.verdict import verdict
    from examples.toy import measure
    from examples.toy.presets import PRESETS, REFERENCE_LRS
    from examples.toy.workload import ToyWorkload

    preset = PRESETS["smoke"]
    wl = ToyWorkload(preset)
    wl.tiers = (64,)
    real, calls = measure.ToyLens.val_loss, {"n": 0}

    def val_loss(self):
        calls["n"] += 1
        return math.nan if calls["n"] == 1 else real(self)
    monkeypatch.setattr(measure.ToyLens, "val_loss", val_loss)
    lrs = {("Muon", 64): REFERENCE_LRS["Muon"]}
    d, = train_runs(wl, lrs, tmp_path / "runs", stream=False)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    assert json.loads((d / "run.json").read_text())["extras"]["status"] == "diverged"

    def never(*a):
        raise AssertionError("a diverged run was trained again")
    monkeypatch.setattr(wl, "run", never)
    d2, = train_runs(wl, lrs, tmp_path / "runs", stream=False)
    assert d2 == d and {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
    run, = open_runs([d])
    assert len(run.measurements) >= 1 and all(math.isfinite(m.val_loss) for m in run.measurements)
    v = verdict([run], target=preset.target_loss, families=("Muon",), unit="examples", fraction=0.2)
    assert v.families["Muon"].diverged == (64,)


# ------------------------------------------------------------------------------------------ the report, by hand

_F = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0)


def _power(alpha):
    return Spectrum(values=torch.tensor([r ** -alpha for r in range(1, 65)], dtype=torch.float64), n_rows=500, dim=64)


def _run(root, tier, vals, alphas, *, diverge_at=None, machine=None):
    """A hand-written Muon run: val loss ``vals[i]`` and an exact power-law spectrum of exponent ``alphas[i]`` at
    progress ``_F[i]`` (budget 1000); from index ``diverge_at`` on its losses are NaN and it is marked diverged."""
    path = root / f"muon-b{tier}"
    info = RunInfo(path.name, family="Muon", batch_tier=tier, total_tokens=1000, n_layer=2,
                   primary_spectrum="act:blocks.1", extras={} if machine is None else {"machine": machine})
    with RunWriter(path, info, tail_window=(10, 40), fsync=False) as w:
        for i, f in enumerate(_F):
            if diverge_at is not None and i >= diverge_at:
                w.log(i, int(1000 * f), val_loss=math.nan, train_loss=math.nan)
                w.update_info(status="diverged", divergence="toy: validation loss nan")
                break
            w.log_measurement(i, int(1000 * f), {"act:blocks.1": _power(alphas[i])}, val_loss=vals[i], progress=f,
                              scalars={"H_S": f, "H_peak": 0.5, "pc1_peak": 0.5})
        else:
            w.update_info(status="complete")
    return path


def _spearman(x, y):
    """Spearman rho of distinct values in float64: Pearson's r of the ranks, by hand."""
    rank = lambda v: [sorted(v).index(a) + 1.0 for a in v]  # noqa: E731
    rx, ry = rank(x), rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_the_reports_numbers_match_a_float64_hand_computation(tmp_path, monkeypatch):
    # alpha rises linearly in progress (exact power laws), so the alpha at the fraction 0.25 (between the 20% and
    # 30% checkpoints) is the linear interpolation; B = 16 reaches the target first and then diverges
    v = lambda *xs: xs  # noqa: E731
    spec = {  # tier: (val losses at _F, alphas at _F)
        16: (v(4.0, 3.0, 1.9, 1.8, 1.7, 1.6, 1.5), v(1.00, 1.10, 1.20, 1.30, 1.40, 1.50, 1.60)),
        32: (v(4.0, 3.2, 2.5, 1.95, 1.8, 1.7, 1.6), v(1.50, 1.52, 1.54, 1.56, 1.58, 1.62, 1.70)),
        64: (v(4.0, 3.3, 2.6, 2.2, 1.9, 1.8, 1.7), v(1.20, 1.30, 1.40, 1.50, 1.60, 1.80, 2.20)),
        128: (v(4.0, 3.5, 2.9, 2.4, 2.1, 1.98, 1.8), v(1.30, 1.31, 1.32, 1.33, 1.34, 1.36, 1.40)),
        256: (v(4.0, 3.6, 3.1, 2.8, 2.5, 2.2, 1.99), v(1.10, 1.20, 1.30, 1.40, 1.50, 1.70, 2.10)),
    }
    dirs = [_run(tmp_path, t, *spec[t], diverge_at=6 if t == 16 else None) for t in spec]
    runs = open_runs(dirs)
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.25)
    monkeypatch.setattr(report, "_save", lambda fig, path: path)
    text = "\n".join(report.toy_sections(wl, runs, tmp_path))

    # Fig. 11a: the first checkpoint at or below 2.0 of every run that did not diverge, and its alpha
    first = {t: next(i for i, x in enumerate(spec[t][0]) if x <= 2.0) for t in spec if t != 16}
    rows = report._matched(runs, "Muon", 2.0, (10, 40))
    assert [r[0] for r in rows] == [32, 64, 128, 256]
    for (t, n, val, a, _), i in zip(rows, first.values()):
        assert n == int(1000 * _F[i]) and val == spec[t][0][i] and a == pytest.approx(spec[t][1][i], abs=1e-9)
        assert f"| {t} | {n:,} | {val:.3f} | {a:.3f} |" in text
    rho_tier = _spearman(list(first), [spec[t][1][i] for t, i in first.items()])
    assert rho_tier == pytest.approx(0.4)
    assert f"Spearman rho(tier, matched-loss alpha) = {rho_tier:.2f} (n = 4)" in text and "B=16." in text

    # Our numbers: rho at 25% of the interpolated alpha against examples to target / the best (B = 16 left out)
    alpha25 = {t: 0.5 * (spec[t][1][2] + spec[t][1][3]) for t in spec if t != 16}
    reach = {t: 1000 * _F[first[t]] for t in first}
    eps = {t: reach[t] / min(reach.values()) for t in reach}
    rho = _spearman([alpha25[t] for t in alpha25], [eps[t] for t in alpha25])
    assert rho == pytest.approx(-0.8)
    assert f"Muon rho at 25% = {rho:.2f} (n = 4)" in text
    assert "| family | 5% | 10% | 15% | 20% | 25% | 30% | 40% | 50% |" in text  # 25% is on the scan grid: once


# ------------------------------------------------------------------------------------------ Fig. 4a's labels


@pytest.mark.filterwarnings("ignore:No artists with labels")
@pytest.mark.parametrize("points", [
    [(1.0, 1000.0, 32), (1.7, 8000.0, 64), (1.7, 8000.0, 128), (1.7, 8000.0, 256), (1.7, 8000.0, 512)],  # top right
    [(1.0, 8000.0, 32), (1.0, 8000.0, 64), (1.0, 8000.0, 128), (1.0, 8000.0, 256), (1.7, 1000.0, 512)],  # top left
    [(1.35, 4500.0, 32), (1.35, 4500.0, 64), (1.35, 4500.0, 128), (1.0, 1000.0, 256), (1.7, 8000.0, 512)],  # middle
])
def test_fig4a_tier_labels_stay_inside_the_axes_when_points_at_the_top_coincide(points):
    # the labels of coincident points were stacked upwards whatever the point's height: at the top of the plot
    # they rose out of the axes, over the title, towards the figure's edge
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    figs = {}

    def keep(fig, path):
        figs[path.name] = fig
        return path
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_save", keep)
        report._figures([], ("Muon",), 2.0, (10, 40), {"Muon": {0.2: 0.5}}, [], [], Path("unused"),
                        {"Muon": points}, 0.2)
    fig = figs["toy_fig4a.png"]
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    ax = fig.axes[1]
    inside = ax.get_window_extent(renderer)
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts if t.get_text().startswith("B=")}
    assert sorted(boxes) == sorted(f"B={t}" for *_, t in points)
    for name, box in boxes.items():
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
            (name, box, inside)
    names = sorted(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)
    import matplotlib.pyplot as plt
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the machine


def test_cpu_model_on_macos_reads_the_brand_string_not_the_architecture(monkeypatch):
    # macOS has no /proc/cpuinfo: platform.processor() says only "arm" (or "i386"), the same for every Apple or
    # Intel chip, so a machine change (the reason the field exists) went unseen there
    monkeypatch.setattr(machine.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(machine.platform, "processor", lambda: "arm")

    def sysctl(cmd, **kw):
        assert cmd == ["sysctl", "-n", "machdep.cpu.brand_string"] and kw.get("timeout")
        return SimpleNamespace(returncode=0, stdout="Apple M2 Pro\n")
    monkeypatch.setattr(machine.subprocess, "run", sysctl)
    assert machine.cpu_model("") == "Apple M2 Pro"

    def missing(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", "sysctl")
    monkeypatch.setattr(machine.subprocess, "run", missing)
    assert machine.cpu_model("") == "arm"  # no sysctl: the architecture, never an error


def test_cpu_model_on_arm_linux_names_the_implementer_and_part():
    # ARM Linux kernels write no "model name": Graviton 2 and 3 both came out as platform.processor()'s "aarch64"
    # (or "unknown"); their "CPU implementer" / "CPU part" lines tell them apart
    text = ("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\nCPU revision\t: 1\n\nprocessor\t: 1\n")
    assert machine.cpu_model(text) == "CPU implementer 0x41, CPU part 0xd40, CPU variant 0x1, CPU revision 1"


def test_machine_info_survives_odd_torch_config_and_is_json(monkeypatch):
    monkeypatch.setattr(torch.__config__, "show", lambda: "Build settings:\n  - BLAS\n\x00weird: : ,,=\n")
    m = machine.machine_info()
    assert json.loads(json.dumps(m, allow_nan=False)) == m and m["blas"] == ["BLAS"]

    def broken():
        raise ImportError("no config in this build")
    monkeypatch.setattr(torch.__config__, "show", broken)
    assert machine.machine_info()["blas"] == []  # a diagnostic never stops a run


def test_the_verdict_names_a_fraction_off_whole_percents_as_the_report_does(tmp_path):
    # the toy report said "Muon rho at 12.5%" while the verdict beside it said "at 12% of the budget"
    from examples.replicate.verdict import verdict

    spec = (4.0, 3.0, 2.5, 1.9, 1.8, 1.7, 1.6)
    runs = open_runs([_run(tmp_path, t, spec, tuple(1.0 + k * f for f in _F)) for t, k in ((16, 1.0), (32, 2.0))])
    v = verdict(runs, target=2.0, families=("Muon",), unit="examples", fraction=0.125, window=(10, 40),
                fractions=(0.1, 0.125))
    assert "at 12.5% of the budget" in v.lines[0]
    assert "rho by progress fraction: 10%: n/a (n = 2), 12.5%: n/a (n = 2)." in "\n".join(v.lines)


def test_the_report_names_the_machines_and_a_sweep_resumed_on_another(tmp_path, monkeypatch):
    # a job resumed on another machine keeps its finished runs and trains the rest there: each run.json said so,
    # but the report (the file a reader compares) named no machine at all
    intel = dict(machine.machine_info(), cpu="Intel(R) Xeon(R) CPU @ 2.20GHz", cpu_capability="AVX2")
    amd = dict(intel, cpu="AMD EPYC 7B13", os="Linux-6.1-other-kernel")
    vals, alphas = (4.0, 3.0, 2.5, 1.9, 1.8, 1.7, 1.6), tuple(1.0 + f for f in _F)
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Muon",), fraction=0.2)
    monkeypatch.setattr(report, "_save", lambda fig, path: path)

    one = open_runs([_run(tmp_path / "a", t, vals, alphas, machine=intel) for t in (16, 32)])
    text = report._machines(one)
    assert text.startswith("## Machine") and "Intel(R) Xeon(R) CPU @ 2.20GHz" in text and "muon-b16, muon-b32" in text
    assert "different machines" not in text
    two = open_runs([_run(tmp_path / "b", 16, vals, alphas, machine=intel),
                     _run(tmp_path / "b", 32, vals, alphas, machine=amd)])
    text = "\n".join(report.toy_sections(wl, two, tmp_path))  # the last section of the report
    assert "## Machine" in text and "AMD EPYC 7B13" in text and "trained on 2 different machines" in text
    same_kernels = open_runs([_run(tmp_path / "c", 16, vals, alphas, machine=intel),
                              _run(tmp_path / "c", 32, vals, alphas, machine=dict(intel, os="Linux-6.2"))])
    assert "different machines" not in report._machines(same_kernels)  # a kernel update changes no CPU kernel
    old = open_runs([_run(tmp_path / "d", t, vals, alphas) for t in (16, 32)])
    assert report._machines(old) == ""  # records made before machines were recorded: no section
