"""Review 27 (smalls): small defects other reviewers noticed and left alone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spectral_lens.records.reader import RunRecord
from spectral_lens.records.schema import RecordFormatError, RunInfo
from spectral_lens.records.writer import RunWriter


# --- 1. RunInfo refuses in memory what the run.json reader refuses -------------------------------------------

@pytest.mark.parametrize("key, value", [("n_layer", 12.0), ("n_layer", 12.5), ("n_layer", True), ("n_layer", "12"),
                                        ("seed", 3.0), ("seed", False), ("family", 3), ("primary_spectrum", 1.5)])
def test_runinfo_refuses_types_the_reader_refuses(key, value):
    with pytest.raises(TypeError, match=rf"RunInfo\.{key}.*{value!r}"):
        RunInfo("r", **{key: value})


def test_runinfo_type_refusals_match_the_reader(tmp_path):
    """Each refused value is one the reader refuses in run.json too (not a stricter rule)."""
    for key, value in [("n_layer", 12.0), ("seed", 3.0), ("family", 3)]:
        d = tmp_path / key
        with RunWriter(d, RunInfo("r")):
            pass
        data = json.loads((d / "run.json").read_text())
        data[key] = value
        (d / "run.json").write_text(json.dumps(data))
        with pytest.raises(RecordFormatError, match=key):
            RunRecord.open(d)


def test_runinfo_accepts_numpy_integers_and_writes_a_readable_run(tmp_path):
    info = RunInfo("r", n_layer=np.int64(24), seed=np.int32(7))
    with RunWriter(tmp_path / "r", info) as w:
        assert w.tail_window == (200, 400)
    run = RunRecord.open(tmp_path / "r")
    assert (run.info.n_layer, run.info.seed) == (24, 7)


# --- 2. percent labels a fraction apart from those it sits among; the report header uses it ---------------------

def test_library_percent_tells_close_fractions_apart():
    from spectral_lens.analysis.efficiency import LABEL_GRID, percent

    assert percent(0.2) == "20%" and percent(0.125) == "12.5%" and percent(0.001) == "0.1%"  # unchanged alone
    assert percent(0.2004, LABEL_GRID) == "20.04%" and percent(0.2, LABEL_GRID) == "20%"
    assert percent(0.1 + 0.2, [0.3]) == "30%"  # one fraction, not 30.000000000000004%
    assert percent(float("nan"), LABEL_GRID) == "nan%" and percent(-0.0, LABEL_GRID) == "0%"


def test_example_percent_is_the_library_one_with_its_grid():
    from examples.replicate import verdict
    from spectral_lens.analysis import efficiency

    assert verdict.LABEL_GRID == efficiency.LABEL_GRID
    for f in (0.2, 0.2004, 0.125, 0.05001, 0.3, 0.999):
        assert verdict.percent(f, [0.2, 0.2004]) == efficiency.percent(f, (0.2, 0.2004, *efficiency.LABEL_GRID))


def test_report_header_labels_an_early_checkpoint_near_20_percent_apart(tmp_path):
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import open_runs
    from spectral_lens.report import build_report

    write_theorem6_sweep(tmp_path / "sw", (2, 4, 8), family="g", n_measure=20, n_eval=100)
    build_report(open_runs([tmp_path / "sw"]), tmp_path / "rep", fraction=0.2004, plots=False)
    assert "Early checkpoint at 20.04% of the token budget" in (tmp_path / "rep" / "report.md").read_text()


# --- 3. Schedule.at_fractions / log_spaced take integer counts, as Schedule.every does --------------------------

@pytest.mark.parametrize("make", [lambda v: __import__("spectral_lens").Schedule.at_fractions(v, [0.5]),
                                  lambda v: __import__("spectral_lens").Schedule.log_spaced(v, 3)])
@pytest.mark.parametrize("value", [10.5, True, "10", float("nan")])
def test_schedule_refuses_a_non_integer_total(make, value):
    with pytest.raises(TypeError, match=r"total_steps.*" + repr(value).replace("'", ".")):
        make(value)


def test_schedule_log_spaced_refuses_non_integer_n_and_first():
    from spectral_lens import Schedule

    with pytest.raises(TypeError, match="n .*2.5"):
        Schedule.log_spaced(100, 2.5)
    with pytest.raises(TypeError, match="first .*1.5"):
        Schedule.log_spaced(100, 3, first=1.5)


def test_schedule_takes_a_whole_float_total_as_its_int():
    from spectral_lens import Schedule

    for s, want in ((Schedule.log_spaced(1000.0, 1), {1000}), (Schedule.log_spaced(1e3, 4), {1, 10, 100, 1000}),
                    (Schedule.at_fractions(10.0, [0.5, 1.0]), {5, 9})):
        assert s.steps == want and all(type(t) is int for t in s.steps)


# --- 4. two parameters (modules) with one record name: refused, naming both; one module by two names: once ------

class _OwnOrigMod(__import__("torch").nn.Module):
    """A model that really has both ``a`` and ``a._orig_mod`` (a child of the user's own named so): their record
    names (wrapper segments dropped) are both ``a``, and ``a.weight`` / ``a._orig_mod.weight`` both ``a.weight``."""

    def __init__(self):
        import torch.nn as nn

        super().__init__()
        self.a = nn.Linear(4, 3)
        self.a._orig_mod = nn.Linear(5, 6)


def test_weight_spectra_refuses_two_parameters_with_one_record_name():
    from spectral_lens.weights import select_parameters, weight_spectra

    for call in (lambda m: weight_spectra(m), lambda m: select_parameters(m), lambda m: weight_spectra(m, "**")):
        with pytest.raises(ValueError, match=r"'a\.weight'.*'a\._orig_mod\.weight'.*'a\.weight'"):
            call(_OwnOrigMod())
    assert set(weight_spectra(_OwnOrigMod(), "a.weight")) == {"a.weight"}  # one of them alone is fine


def test_select_modules_refuses_two_modules_with_one_record_name_listed_apart():
    from spectral_lens.capture import select_modules

    with pytest.raises(ValueError, match=r"'a'.*'a\._orig_mod'"):
        select_modules(_OwnOrigMod(), ["a", "a._orig_mod"])
    assert [n for n, _ in select_modules(_OwnOrigMod(), "a")] == ["a"]  # the name as typed: that module


def test_select_modules_selects_a_compiled_module_listed_by_two_names_once():
    import torch
    import torch.nn as nn

    from spectral_lens.capture import select_modules

    model = nn.Sequential()
    model.add_module("a", torch.compile(nn.Linear(4, 3)))
    chosen = select_modules(model, ["a", "a._orig_mod"])  # one module (wrapper and wrapped): measured once
    assert [n for n, _ in chosen] == ["a"]


# --- 5. spearman's exact_max is bounded: n! pairings past the bound hang -------------------------------------------

@pytest.mark.parametrize("bad", [11, 10**6, 2.5, True, "8"])
def test_spearman_refuses_an_exact_max_beyond_its_limit(bad):
    from spectral_lens.analysis.spearman import spearman

    with pytest.raises((ValueError, TypeError), match=r"exact_max.*10"):
        spearman([1, 2, 3, 4], [1, 3, 2, 4], exact_max=bad)


def test_spearman_names_its_limit():
    import importlib

    mod = importlib.import_module("spectral_lens.analysis.spearman")

    assert mod.EXACT_LIMIT == 10 and mod.EXACT_MAX <= mod.EXACT_LIMIT


def test_spearman_exact_up_to_the_limit_against_a_float64_enumeration():
    import itertools
    import math

    from spectral_lens.analysis.spearman import spearman

    x, y = np.array([0.1, 0.5, 0.2, 0.9, 0.7, 0.3]), np.array([1.0, 2.0, 4.0, 3.0, 6.0, 5.0])
    rho, p = spearman(x, y, exact_max=6)
    rx, ry = np.argsort(np.argsort(x)).astype(np.float64), np.argsort(np.argsort(y)).astype(np.float64)
    rhos = [np.corrcoef(np.array(perm), ry)[0, 1] for perm in itertools.permutations(rx)]
    assert math.isclose(rho, np.corrcoef(rx, ry)[0, 1], abs_tol=1e-12)
    share = np.mean(np.abs(rhos) >= abs(rho) - 1e-12)  # no ties: symmetric null, two-sided = this share
    assert math.isclose(p, share, rel_tol=1e-9)


# --- 6. integer eigenvalues have no round-off: any negative one is refused -----------------------------------------

@pytest.mark.parametrize("dtype", ["int64", "int32", "int16"])
def test_integer_eigenvalues_refuse_any_negative(dtype):
    import torch

    from spectral_lens.spectra.ranks import participation_ratio, rankme, stable_rank

    big = 10**11 if dtype == "int64" else 30_000
    values = torch.tensor([big, 5, -1], dtype=getattr(torch, dtype))
    for f in (rankme, participation_ratio, stable_rank):
        with pytest.raises(ValueError, match=r"negative eigenvalue -1"):
            f(values)
    assert float(stable_rank(torch.tensor([big, 5, 0], dtype=getattr(torch, dtype)))) == pytest.approx(
        (big + 5) / big, rel=1e-15)  # a zero is still fine


def test_integer_list_through_summaries_refuses_a_negative():
    from spectral_lens import summaries

    with pytest.raises(ValueError, match="negative eigenvalue"):
        summaries.stable_rank([10**11, 3, -1])
    assert summaries.stable_rank([10**11, 3, 0]) == pytest.approx(1 + 3e-11, rel=1e-15)
    assert summaries.stable_rank([1e11, 3.0, -1.0]) == pytest.approx(1 + 3e-11, rel=1e-15)  # float64: round-off
