"""Review 23 (cli): the ``spectral-lens`` command line as a new user meets it. A toss-up among three or
more tiers names every one of them; ``inspect FILE.npz`` compares r* with the window the run recorded
(or ``--window``) and says which; the public helpers' homes; adversarial argv gives one line and status 2."""

from __future__ import annotations

import json
import math

import pytest

from spectral_lens.analysis.ranking import TierRanking, close_call, rank_tiers


def _hand(p_best: dict, values: dict | None = None, n_draws: int = 4000) -> TierRanking:
    """A ranking with given shares (tiers in ``p_best``'s order, the first recommended)."""
    tiers = tuple(p_best)
    values = values or {t: 1.0 + 0.001 * i for i, t in enumerate(tiers)}
    return TierRanking(family="f", statistic="alpha_tail", tiers=tiers, values=values,
                       sigmas={t: 0.1 for t in tiers}, p_best=dict(p_best), recommended=tiers[0],
                       p_recommended=p_best[tiers[0]], run_ids={t: (f"r{t:g}",) for t in tiers}, n_draws=n_draws)


# ---- 1: a toss-up among three tiers names all three ---------------------------------------------------------


def test_close_call_names_every_tier_within_error_of_the_recommended():
    """Three tiers of equal value share P(best) about 1/3 each: the caution named only the top two ('tiers 4
    and 8'), as if tier 16 were clearly behind."""
    rk = rank_tiers("f", [(4, "a", 1.0, 0.01), (8, "b", 1.0, 0.01), (16, "c", 1.0, 0.01)], statistic="alpha_tail")
    assert all(abs(p - 1 / 3) < 0.05 for p in rk.p_best.values())
    c = close_call(rk)
    assert c.startswith("family f: tiers 4, 8 and 16 are too close to call: P(best) "), c
    assert f"{rk.p_best[4]:.3f} vs {rk.p_best[8]:.3f}, {rk.p_best[16]:.3f}" in c
    assert "equal values: the smaller tier first" in c and "treat these 3 as equal" in c
    # four tiers, the last clearly behind: the three within error are named, the fourth is not
    rk4 = rank_tiers("f", [(4, "a", 1.0, 0.01), (8, "b", 1.0, 0.01), (16, "c", 1.0, 0.01), (32, "d", 2.0, 0.01)])
    assert rk4.p_best[32] == 0.0
    c4 = close_call(rk4)
    assert c4.startswith("family f: tiers 4, 8 and 16 are too close to call: ") and "tier 32" not in c4
    assert c4.count(" vs ") == 2 and len(c4.split(" vs ")[1].split(" (")[0].split(", ")) == 2  # two rivals' P(best)


def test_close_call_wording_by_who_leads():
    # one rival with the larger share, one within error below
    c = close_call(_hand({4: 0.33, 8: 0.35, 16: 0.32}))
    assert c.startswith("family f: tiers 4, 8 and 16 are too close to call: P(best) 0.330 vs 0.350, 0.320 "
                        "(tier 8 has a larger P(best): +-"), c
    # two rivals with larger shares
    c = close_call(_hand({4: 0.30, 8: 0.36, 16: 0.34}))
    assert "(tiers 8 and 16 have a larger P(best): +-" in c
    # none larger, all within error: the largest margin is given, from the recommended tier
    c = close_call(_hand({4: 0.34, 8: 0.33, 16: 0.33}))
    assert "(all 3 are within Monte Carlo error: +-" in c and "or less on each difference from tier 4" in c
    m = 2 * math.sqrt((0.34 + 0.33 - 0.01 ** 2) / 4000)
    assert f"+-{m:.3f} or less" in c
    # a third tier clearly behind: the two-tier wording, unchanged
    c = close_call(_hand({4: 0.49, 8: 0.49, 16: 0.02}))
    assert c.startswith("family f: tiers 4 and 8 are too close to call: P(best) 0.490 vs 0.490 (the two are "
                        "within Monte Carlo error: +-"), c
    assert "on the difference, 4000 draws" in c and "treat them as equal" in c
    # a clear lead over both: nothing
    assert close_call(_hand({4: 0.80, 8: 0.15, 16: 0.05})) is None


# ---- 2: inspect FILE.npz compares r* with the run's window, or --window, and says which ----------------------


def _theorem6(t: float = 0.5):
    """A 768-wide activation spectrum with its crossover rank r* at 67.3 (head alpha 1, tail alpha 2.2)."""
    import torch

    from spectral_lens import Spectrum
    from spectral_lens.analysis.synthetic import theorem6_activation

    return Spectrum(torch.tensor(theorem6_activation(t, dim=768, eta=25.0, q=0.6).copy()), n_rows=10_000, dim=768)


def _run_with_spectrum(root, run_id, tail_window=(10, 40), n_layer=12):
    """A run directory with one measurement of :func:`_theorem6`; returns its spectrum file."""
    from spectral_lens.records import RunInfo, RunWriter

    info = RunInfo(run_id, family="f", batch_tier=8, total_tokens=1000, n_layer=n_layer)
    with RunWriter(root / run_id, info, fsync=False, tail_window=tail_window) as w:
        w.log_measurement(1, 100, {"act": _theorem6()})
    (npz,) = sorted((root / run_id / "spectra").glob("*.npz"))
    return npz


def _inspect(capsys, *argv):
    from spectral_lens.cli import main

    assert main(["inspect", *map(str, argv)]) == 0
    return capsys.readouterr().out


def _line(out: str, start: str) -> str:
    return next(x for x in out.splitlines() if x.startswith(start))


def test_inspect_spectrum_file_uses_its_runs_recorded_window(tmp_path, capsys):
    """A spectrum of a run recorded with tail window [10, 40] was compared with [100, 200] ('starts beyond
    r* = 67'): the run's own window starts in the head, which is what the user needed to hear."""
    npz = _run_with_spectrum(tmp_path, "w10")
    out = _inspect(capsys, npz)
    assert f"  tail window: ranks [10, 40] (recorded in {tmp_path / 'w10' / 'run.json'})" in out
    assert _line(out, "  alpha_tail [10, 40]: ")
    assert _line(out, "  crossover rank r*: 67.3").endswith(
        "the alpha_tail window [10, 40] starts before it (in the head: it underestimates the tail exponent)")
    # a relative path from inside RUN/spectra finds the run too
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(npz.parent)
        assert "  tail window: ranks [10, 40] (recorded in " in _inspect(capsys, npz.name)
    # --window overrides the run's window and says so
    out = _inspect(capsys, npz, "--window", "100", "200")
    assert "  tail window: ranks [100, 200] (--window)" in out and _line(out, "  alpha_tail [100, 200]: ")
    assert _line(out, "  crossover rank r*: 67.3").endswith("the alpha_tail window [100, 200] starts beyond it")


def test_inspect_spectrum_file_window_sources(tmp_path, capsys):
    # a run without a recorded tail window: predict's scale rule for its n_layer (d36 -> [200, 400])
    npz = _run_with_spectrum(tmp_path, "d36", tail_window=None, n_layer=36)
    header = json.loads((tmp_path / "d36" / "run.json").read_text())
    header["summary_windows"].pop("tail", None)
    (tmp_path / "d36" / "run.json").write_text(json.dumps(header))
    out = _inspect(capsys, npz)
    assert _line(out, "  tail window: ranks [200, 400] (scale rule for n_layer 36 in ")
    assert "--window LO HI to choose" in out
    # a file outside any run directory: the d12 window, said so
    loose = tmp_path / "loose.npz"
    _theorem6().save(loose)
    out = _inspect(capsys, loose)
    assert ("  tail window: ranks [100, 200] (the d12 window; the file is not in a run directory; "
            "--window LO HI to choose)") in out
    # an unreadable run.json beside the file is named, not fatal
    npz = _run_with_spectrum(tmp_path, "broken")
    (tmp_path / "broken" / "run.json").write_text("[1, 2]")
    out = _inspect(capsys, npz, "--window", "10", "40")
    assert "  tail window: ranks [10, 40] (--window)" in out
    out = _inspect(capsys, npz)
    assert _line(out, "  tail window: ranks [100, 200] (the d12 window; ").endswith(
        "run.json cannot be read: " f"{tmp_path / 'broken' / 'run.json'}: not a JSON object; --window LO HI to choose)")
    # a recorded window that is not LO < HI (the reader checks its types only): named, the d12 window used
    npz = _run_with_spectrum(tmp_path, "swapped")
    header = json.loads((tmp_path / "swapped" / "run.json").read_text())
    header["summary_windows"] = {"tail": [40, 10], "head": [0, 5]}
    (tmp_path / "swapped" / "run.json").write_text(json.dumps(header))
    out = _inspect(capsys, npz)
    assert (f"  tail window: ranks [100, 200] (the d12 window; {tmp_path / 'swapped' / 'run.json'} records tail "
            "window [40, 10], not 1-based ranks LO < HI; --window LO HI to choose)") in out
    assert _line(out, "  alpha_head [10, 40]: ")
    # a window beyond the spectrum: said, not silently left out
    out = _inspect(capsys, loose, "--window", "10", "5000")
    assert "  alpha_tail [10, 5000]: not fitted (the window does not fit this spectrum" in out


def test_inspect_window_is_checked_and_refused_for_a_run_directory(tmp_path, capsys):
    from spectral_lens.cli import main

    npz = _run_with_spectrum(tmp_path, "r")
    for argv, want in ((["--window", "5", "3"], "argument --window: expected 1-based ranks LO < HI, got 5 3"),
                       (["--window", "0", "0"], "argument --window: expected 1-based ranks LO < HI, got 0 0"),
                       (["--window", "x", "3"], "argument --window: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as exc:
            main(["inspect", str(npz), *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("spectral-lens inspect: error: ") and want in err, err
    assert main(["inspect", str(tmp_path / "r"), "--window", "10", "40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--window applies to a spectrum .npz file" in err


# ---- 3: where the public helpers live --------------------------------------------------------------------------


def test_caution_helpers_public_homes():
    """``close_call`` and ``reached_at_first_evaluation`` are analysis helpers, exported by
    ``spectral_lens.analysis`` (commit 981e6de); the caution builders over records (``target_flags``,
    ``ranking_flags``, ``score_flags``) are the report's, exported by ``spectral_lens.report``: analysis
    does not import the report layer (data flows one way), so it does not re-export them."""
    import re
    from pathlib import Path

    from spectral_lens import analysis, report
    from spectral_lens.analysis import efficiency, ranking

    assert analysis.close_call is ranking.close_call and "close_call" in analysis.__all__
    assert analysis.reached_at_first_evaluation is efficiency.reached_at_first_evaluation
    assert "reached_at_first_evaluation" in analysis.__all__
    for name in ("target_flags", "ranking_flags", "score_flags"):
        assert name in report.__all__ and name not in analysis.__all__
    importers = [p.name for p in Path(analysis.__file__).parent.glob("*.py")
                 if re.search(r"^\s*(from|import) (\.\.|spectral_lens\.)report\b", p.read_text(encoding="utf-8"), re.MULTILINE)]
    assert importers == []


# ---- 4: adversarial argv: one line on stderr and status 2, or a correct result ---------------------------------


@pytest.fixture(scope="module")
def play(tmp_path_factory):
    """A 3-tier sweep, and beside it the half-written and wrong inputs a user meets."""
    import os
    import shutil

    from spectral_lens.analysis.synthetic import write_theorem6_sweep

    root = tmp_path_factory.mktemp("review23_cli")
    write_theorem6_sweep(root / "sweep", (2, 4, 8), family="base", n_measure=8, n_eval=20)
    run = root / "sweep" / "base-b4"
    (root / "empty").mkdir()
    for name, text in (("emptyjson", b""), ("listjson", b"[1, 2]"), ("nonutf", b'{"run_id": "\xff\xfe"}')):
        shutil.copytree(run, root / name)
        (root / name / "run.json").write_bytes(text)
    shutil.copytree(run, root / "trunc")
    for f in ("log.jsonl", "measurements.jsonl"):
        data = (root / "trunc" / f).read_bytes()
        (root / "trunc" / f).write_bytes(data[:-30])  # a half-written last line
    (root / "loop" / "a").mkdir(parents=True)
    os.symlink("..", root / "loop" / "a" / "back")
    (root / "afile.txt").write_text("not a run")
    return root


def _run(argv):
    """``main(argv)``'s status and stderr lines (a traceback fails the test)."""
    import contextlib
    import io

    from spectral_lens.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exc:
            status = exc.code
    return status, err.getvalue().splitlines()


def _one_error(argv, want: str):
    status, lines = _run(argv)
    errors = [x for x in lines if ": warning: " not in x]
    assert status == 2 and len(errors) == 1, (argv, status, lines)
    assert errors[0].startswith(f"spectral-lens {argv[0]}: error: ") and want in errors[0], (argv, errors)


def test_an_empty_path_argument_is_refused_not_read_as_the_current_directory(play, monkeypatch):
    """``predict "$RUNS"`` with RUNS unset read the current directory (a sweep root there was ranked without a
    word); ``inspect ""`` inspected it. ``--out ""`` was already refused."""
    monkeypatch.chdir(play / "sweep")
    assert _run(["predict", "."])[0] == 0  # the current directory, when named, is fine
    _one_error(["predict", ""], "argument RUN_DIR: expected a path, got ''")
    _one_error(["report", play / "sweep", "--out", play / "r", "--replicates", " "], "argument --replicates: expected a path")
    monkeypatch.chdir(play / "sweep" / "base-b4")
    _one_error(["inspect", ""], "argument FILE_OR_RUN_DIR: expected a path, got ''")


def test_out_that_is_a_file_and_unknown_options_name_the_problem_and_the_command(play):
    """``--out FILE`` said only 'FILE: File exists'; an unknown option said 'spectral-lens: error: ...',
    without the command every other error names."""
    _one_error(["report", play / "sweep", "--out", play / "afile.txt", "--no-plots"],
               f"argument --out: expected an output directory, got '{play / 'afile.txt'}', an existing file")
    _one_error(["predict", play / "sweep", "--bogus"], "unrecognized arguments: --bogus")
    _one_error(["inspect", play / "afile.txt", "extra"], "unrecognized arguments: extra")
    _one_error(["report", play / "sweep", "--out", play / "r", "--bogus", "1"], "unrecognized arguments: --bogus 1")


@pytest.mark.parametrize("argv, want", [
    (["predict"], "the following arguments are required: RUN_DIR"),
    (["report", "{sweep}"], "the following arguments are required: --out"),
    (["inspect"], "the following arguments are required: FILE_OR_RUN_DIR"),
    (["predict", "{root}/empty"], "empty: not a spectral-lens run directory (no run.json)"),
    (["predict", "{root}/nonexistent"], "nonexistent: not a spectral-lens run directory"),
    (["predict", "{root}/afile.txt"], "afile.txt: not a spectral-lens run directory"),
    (["predict", "{root}/emptyjson"], "emptyjson/run.json: corrupted run metadata"),
    (["predict", "{root}/listjson"], "listjson/run.json: not a JSON object"),
    (["predict", "{root}/nonutf"], "nonutf/run.json: corrupted run metadata ('utf-8' codec"),
    (["predict", "{root}/loop"], "loop: not a spectral-lens run directory"),
    (["inspect", "{root}/loop"], "loop: not a spectral-lens run directory"),
    (["inspect", "{root}/listjson"], "listjson/run.json: not a JSON object"),
    (["inspect", "{root}/afile.txt"], "afile.txt: not a NumPy .npz archive"),
    (["inspect", "{root}/nonexistent"], "nonexistent: no such file or directory"),
    (["inspect", "{sweep}"], "sweep: not a spectral-lens run directory"),
    (["predict", "{sweep}", "--target-loss", "nan"], "argument --target-loss: expected a finite validation loss > 0"),
    (["predict", "{sweep}", "--target-loss=-inf"], "argument --target-loss: expected a finite validation loss > 0"),
    (["predict", "{sweep}", "--target-loss", "-inf"], "argument --target-loss: expected one argument"),  # argparse: an option
    (["predict", "{sweep}", "--window", "0", "0"], "argument --window: expected 1-based ranks LO < HI, got 0 0"),
    (["predict", "{sweep}", "--window", "5", "3"], "argument --window: expected 1-based ranks LO < HI, got 5 3"),
    (["predict", "{sweep}", "--window", "10", "99999999999999999999"], "exceeds the spectrum"),
    (["predict", "{sweep}", "--fraction", "nan"], "argument --fraction: expected a fraction of the token budget in (0, 1]"),
    (["predict", "{sweep}", "--fraction", "1e-300"], "cannot interpolate"),
    (["predict", "{sweep}", "{sweep}"], "run ids must be unique"),
    (["report", "{sweep}", "--out", "/dev/null/r", "--no-plots"], "/dev/null/r: Not a directory"),
    (["report", "{root}/trunc", "--out", "{root}/r", "--no-plots", "--window", "5", "3"], "argument --window"),
    (["report", "{root}/listjson", "--out", "{root}/r", "--no-plots"], "listjson/run.json: not a JSON object"),
])
def test_adversarial_argv_is_one_line_and_status_2(play, argv, want):
    _one_error([a.format(root=play, sweep=play / "sweep") for a in argv], want.format(root=play))


def test_half_written_records_give_a_result_with_one_warning_per_line(play):
    """A truncated last line (a write in progress) costs that line, with one warning each, even under --strict."""
    for argv in (["predict", play / "trunc"], ["predict", play / "trunc", "--strict", "--json"], ["inspect", play / "trunc"],
                 ["report", play / "trunc", "--out", play / "r-trunc", "--no-plots"]):
        status, lines = _run(argv)
        assert status == 0 and len(lines) == 2 and all(": warning: " in x and "truncated last line" in x for x in lines)


def test_predict_prints_a_three_way_toss_up(tmp_path, capsys):
    """End to end: three tiers of one q and eta (the same early alpha_tail) are one caution naming all three."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.cli import main

    write_theorem6_sweep(tmp_path, (4, 8, 16), family="tie", q={4: 1.0, 8: 1.0, 16: 1.0}, eta=25.0, n_measure=8, n_eval=20)
    assert main(["predict", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [x for x in out.splitlines() if x.startswith("caution: ")] == [
        next(x for x in out.splitlines() if x.startswith("caution: family tie: tiers 4, 8 and 16 are too close to call"))]
    assert main(["predict", str(tmp_path), "--json"]) == 0
    (c,) = json.loads(capsys.readouterr().out)["families"]["tie"]["cautions"]
    assert c.startswith("family tie: tiers 4, 8 and 16 are too close to call")
