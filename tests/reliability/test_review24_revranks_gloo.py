"""Review of the constructor's agreement with ``group=`` a subgroup (``dist.new_group``), on 3 gloo CPU ranks: the
subgroup's members agree among themselves (a failed member named by its global rank), a rank outside the subgroup
builds its lens without a collective, a group of one rank makes none, and every rank is in step afterwards (the
case runner's world barrier). The 2-rank world cases are in ``test_review24_ranks_gloo.py``."""

from __future__ import annotations

import pytest
import torch

from spectral_lens import SpectralLens

from support.models import TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

WORLD = 3
SUBGROUP = [1, 2]
PG_TIMEOUT_S = 30  # a rank left waiting fails after this
DEADLINE_S = 15.0  # every rank returns or raises well before the timeout
JOIN_S = 400.0


def _lens(n_layers: int, group, **kwargs) -> SpectralLens:
    torch.manual_seed(0)
    return SpectralLens(TinyLM(layers=n_layers).double(), lm_pool(n_batches=4), params=(), progress=False,
                        group=group, **kwargs)


def _member_fails(rank: int, group):
    """Global rank 2 (the subgroup's rank 1) lacks ``h.2``; rank 0 is outside the subgroup."""
    _lens(3 if rank != 2 else 2, group, layers="h.2")
    return "built"


def _built_alike(rank: int, group):
    """Every rank builds; the subgroup's members measure together, rank 0 (outside it) does not measure."""
    lens = _lens(3, group, layers="h.2")
    if rank == 0:
        return "built"
    return lens.measure(1, 1).spectra["act:h.2"].values[:3].tolist()


def _group_of_one(rank: int, group):
    """Every rank creates ``new_group([0])``; rank 0 builds and measures in it alone (world 1: no collective)."""
    import torch.distributed as dist

    solo = dist.new_group([0])
    if rank != 0:
        return "idle"
    return _lens(3, solo, layers="h.2").measure(1, 1).spectra["act:h.2"].n_rows


CASES = {"member_fails": _member_fails, "built_alike": _built_alike, "group_of_one": _group_of_one}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("review24_revranks"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="spectral_lens", subgroup=SUBGROUP)


@pytest.mark.slow  # one spawn of 3 ranks, three cases: ~30 s on the loaded 2-core CPU
@pytest.mark.distributed
def test_a_subgroup_members_failure_is_agreed_by_the_members_naming_its_global_rank(results):
    got = checked_case(results, "member_fails", DEADLINE_S)
    assert got[0]["error"] is None and got[0]["value"] == "built", got  # outside the subgroup: no collective
    assert got[2]["error"].startswith("ValueError: SpectralLens layers='h.2': "), got
    assert got[1]["error"].startswith(
        "RuntimeError: SpectralLens: building the lens failed on global rank(s) [2] (global rank 2: ValueError: "
        "SpectralLens layers='h.2': "), got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_subgroup_builds_and_measures_with_a_rank_outside_it(results):
    got = checked_case(results, "built_alike", DEADLINE_S)
    assert [r["error"] for r in got] == [None] * WORLD, got
    assert got[0]["value"] == "built" and got[1]["value"] == got[2]["value"], got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_group_of_one_rank_builds_and_measures_alone(results):
    got = checked_case(results, "group_of_one", DEADLINE_S)
    assert [r["error"] for r in got] == [None] * WORLD, got
    assert got[0]["value"] == 4 * 3 * 16 and got[1]["value"] == got[2]["value"] == "idle", got
