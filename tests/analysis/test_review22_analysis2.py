"""Review 22 (analysis2): honest edges of the batch-size prediction's output. A single run left out because it
failed says so, as a left-out run among several does; ``predict --json`` tells an ``eps_tok`` known to be
infinite from an unknown one; a target every run reached at its first evaluation is a caution; a recommended
tier that is a toss-up with another (P(best) within Monte Carlo error, or smaller) is a caution."""

from __future__ import annotations

import contextlib
import json
import math
import warnings

import numpy as np
import pytest

from spectral_lens.analysis import FractionNotReachedError, tokens_to_target
from spectral_lens.analysis.efficiency import reached_at_first_evaluation
from spectral_lens.analysis.ranking import close_call, rank_tiers
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.analysis.tail import TailPredictor
from spectral_lens.cli import main
from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.report import build_report, ranking_flags, target_flags
from spectral_lens.spectrum import Spectrum


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("review22_analysis2")
    write_theorem6_sweep(root / "four", (2, 4, 8, 16), family="base", n_measure=20, n_eval=100)
    # two tiers of one q and eta: the same early alpha_tail, a toss-up
    write_theorem6_sweep(root / "tie", (4, 32), family="tie", q={4: 1.0, 32: 1.0}, eta=25.0, n_measure=20, n_eval=100)
    return root


def _predict(capsys, *argv, json_out=False):
    assert main(["predict", *map(str, argv), *(["--json"] if json_out else [])]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if json_out else out


# ---- 1: one run, left out because it failed ------------------------------------------------------------------


def _short_run(root, run_id, raises=None):
    """One measurement at 10% of a 1000-token budget; the writer's block then raises ``raises``."""
    info = RunInfo(run_id, family="f", batch_tier=8, total_tokens=1000, n_layer=12)
    spec = {"act": Spectrum(np.arange(1, 301, dtype=float) ** -1.0, n_rows=10_000, dim=300)}
    expect = pytest.raises(type(raises)) if raises is not None else contextlib.nullcontext()
    with expect, RunWriter(root / run_id, info, fsync=False, tail_window=(10, 40)) as w:
        w.log_measurement(1, 100, spec)
        if raises is not None:
            raise raises
    return root / run_id


def test_one_failed_run_error_says_it_failed(tmp_path, capsys):
    """The one-run error was the bare 'latest measurement is at progress 0.100 < 0.5', without the
    '; it failed (...)' that the same run gets as a note among several."""
    c = _short_run(tmp_path, "c", RuntimeError("preempted"))
    with pytest.raises(FractionNotReachedError) as exc:  # the type is kept
        TailPredictor(0.5).fit([c])
    assert str(exc.value) == "run 'c': latest measurement is at progress 0.100 < 0.5; it failed (RuntimeError: preempted)"
    assert main(["predict", str(c), "--fraction", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("< 0.5; it failed (RuntimeError: preempted)"), err
    # a run still going (not failed) keeps its plain message
    g = _short_run(tmp_path, "g")
    with pytest.raises(FractionNotReachedError, match=r"^run 'g': latest measurement is at progress 0\.100 < 0\.5$"):
        TailPredictor(0.5).fit([g])


# ---- 2: eps_tok inf (never) vs NaN (unknown) in --json -------------------------------------------------------


def test_json_eps_tok_status_tells_never_from_unknown(tmp_path, capsys):
    """Both were ``"eps_tok": null``; ``target_status`` told them apart only for a run cut short, not for a run
    that ended above the target in a family where no run reached it (NaN: no reference) vs one where one did (inf)."""
    write_theorem6_sweep(tmp_path / "s", (2, 4, 8, 16), family="base", n_measure=20, n_eval=100)
    run = tmp_path / "s" / "base-b8"  # cut short at ~30%: above 2.9, may still reach it
    for name in ("log.jsonl", "measurements.jsonl"):
        lines = (run / name).read_text().splitlines()
        (run / name).write_text("\n".join(lines[: int(len(lines) * 0.3)]) + "\n")
    assert math.isinf(tokens_to_target(RunRecord.open(run), 2.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = _predict(capsys, tmp_path / "s", "--target-loss", "2.9", json_out=True)
        by_run = {t["runs"][0]: t for t in data["families"]["base"]["tiers"]}
        # b16 ended above 2.9 (inf: ranks last), b8 is cut short (NaN), b4 reached it
        assert by_run["base-b16"]["eps_tok"] == [None] and by_run["base-b16"]["eps_tok_status"] == ["not reached"]
        assert by_run["base-b16"]["target_status"] == ["not reached"]
        assert by_run["base-b8"]["eps_tok"] == [None] and by_run["base-b8"]["eps_tok_status"] == ["unknown"]
        assert by_run["base-b4"]["eps_tok"] == [1.0] and by_run["base-b4"]["eps_tok_status"] == ["known"]
        # no run reached 1.0: every eps_tok unknown, although every T is "not reached"
        data = _predict(capsys, tmp_path / "s", "--target-loss", "1.0", json_out=True)
        for t in data["families"]["base"]["tiers"]:
            assert t["eps_tok"] == [None] and t["eps_tok_status"] == ["unknown"], t
        text = _predict(capsys, tmp_path / "s", "--target-loss", "2.9")
    rows = {x.split()[-1]: x for x in text.splitlines() if x.rstrip().endswith(("base-b8", "base-b16"))}
    assert "not reached yet" in rows["base-b8"] and "unknown" in rows["base-b8"]  # was "nan", JSON's word now
    assert rows["base-b16"].count("not reached") == 2  # T and eps_tok


# ---- 3: every run reached the target at its first evaluation -------------------------------------------------


def test_target_reached_at_first_evaluation_is_a_caution(sweeps, capsys, tmp_path):
    """A target above every first evaluation gave eps_tok 1.000 vs 1.053 (evaluation spacings) and a rho, with
    no word that the score means nothing."""
    runs = [RunRecord.open(p) for p in sorted((sweeps / "four").iterdir())]
    assert all(reached_at_first_evaluation(r, 10.0) for r in runs)
    assert not any(reached_at_first_evaluation(r, 3.2) for r in runs)
    assert not reached_at_first_evaluation(([2.0, 1.0], [3.0, 5.0]), 4.0)  # token order, not file order
    assert reached_at_first_evaluation(([2.0, 1.0], [5.0, 3.0]), 4.0)
    assert not reached_at_first_evaluation(([], []), 4.0)
    want = "family base: every run (4) reached val loss 10 at its first evaluation"
    assert [f[: len(want)] for f in target_flags(runs, 10.0)] == [want] and target_flags(runs, 3.2) == []
    assert target_flags(runs[:1], 10.0) == []  # one run: nothing compared
    text = _predict(capsys, sweeps / "four", "--target-loss", "10")
    assert f"caution: {want}" in text and "the score means nothing here; choose a lower target loss." in text
    data = _predict(capsys, sweeps / "four", "--target-loss", "10", json_out=True)
    assert any(c.startswith(want) for c in data["score"]["cautions"])
    assert not any("first evaluation" in c for c in _predict(capsys, sweeps / "four", "--target-loss", "3.2",
                                                             json_out=True)["score"]["cautions"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = build_report([sweeps / "four"], tmp_path / "r", target_loss=10.0, plots=False)
    assert any(f.startswith(want) for f in rep.flags) and want in rep.path.read_text()


# ---- 4: a toss-up between the top tiers ----------------------------------------------------------------------


def test_close_call_on_rankings():
    """Equal values: P(best) splits about 0.5 / 0.5 by draw noise and the point estimate's tier may get the
    smaller share; the recommendation stays the point estimate, with a caution."""
    rk = rank_tiers("f", [(4, "a", 1.0, 0.01), (32, "b", 1.0, 0.01)], statistic="alpha_tail", random_state=0)
    seeds = [s for s in range(40) if (r := rank_tiers("f", [(4, "a", 1.0, 0.01), (32, "b", 1.0, 0.01)],
                                                       random_state=s)).p_best[4] < r.p_best[32]]
    assert seeds  # the point estimate's tier loses the draw lottery for some seeds
    worse = rank_tiers("f", [(4, "a", 1.0, 0.01), (32, "b", 1.0, 0.01)], statistic="alpha_tail", random_state=seeds[0])
    assert worse.recommended == 4  # the documented rule: the point estimate (ties: the smaller tier)
    c = close_call(worse)
    assert c.startswith("family f: tiers 4 and 32 are too close to call: P(best) ") and "tier 32 has the larger P(best)" in c
    assert "equal values: the smaller tier first" in c and "n_draws" not in c
    assert close_call(rk) is not None
    # a clear lead, one tier, and NaN sigmas: nothing to say
    assert close_call(rank_tiers("f", [(4, "a", 1.0, 0.01), (32, "b", 2.0, 0.01)])) is None
    assert close_call(rank_tiers("f", [(4, "a", 1.0, 0.01)])) is None
    assert close_call(rank_tiers("f", [(4, "a", 1.0, math.nan), (32, "b", 1.0, 0.01)])) is None
    # true P(best) 0.508 vs 0.492: within 2 MC errors of the difference (0.032 at 4000 draws); 0.69 vs 0.31 is not
    near = rank_tiers("f", [(4, "a", 1.0, 0.1), (32, "b", 1.0 + 0.1 * math.sqrt(2) * 0.02, 0.1)], n_draws=4000)
    assert near.p_best[4] > near.p_best[32] and close_call(near) is not None
    assert "the two are within Monte Carlo error" in close_call(near)
    far = rank_tiers("f", [(4, "a", 1.0, 0.1), (32, "b", 1.0 + 0.1 * math.sqrt(2) * 0.5, 0.1)], n_draws=4000)
    assert far.p_best[4] > 0.6 and close_call(far) is None
    assert ranking_flags({"f": worse, "g": far}) == [c]


def test_predict_and_report_show_a_toss_up(sweeps, capsys, tmp_path):
    """predict recommended tier 4 at P(best) 0.499 while tier 32 had 0.500, and said nothing."""
    text = _predict(capsys, sweeps / "tie")
    assert "family tie: recommended tier 4" in text
    assert "caution: family tie: tiers 4 and 32 are too close to call" in text
    fam = _predict(capsys, sweeps / "tie", json_out=True)["families"]["tie"]
    assert fam["recommended"] == 4 and len(fam["cautions"]) == 1 and "too close to call" in fam["cautions"][0]
    assert _predict(capsys, sweeps / "four", json_out=True)["families"]["base"]["cautions"] == []
    assert "too close to call" not in _predict(capsys, sweeps / "four")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = build_report([sweeps / "tie"], tmp_path / "r", plots=False)  # no target: still said
    assert len(rep.flags) == 1 and "Caution: family tie: tiers 4 and 32 are too close to call" in rep.path.read_text()
