"""An error in ONE rank's ``SpectralLens`` constructor, on 2 gloo CPU ranks: every rank raises in the constructor
at once, the others naming the failed rank and its error, and the ranks are in step afterwards.

Before (reproduced with these cases and a 20 s process-group timeout): the failed rank raised in its constructor,
before any collective, and (its process living on: a script that catches the error, or a slow shutdown) went on
to its next collective; the other rank built its lens, ran its first ``measure`` and waited in its first agreement
until the process-group timeout, then raised gloo's timeout error (no word of the constructor's error).

Now the constructor ends with one ``all_reduce`` of a failure flag per rank over the lens's group (one per lens
built under ``torch.distributed``, none per measurement), and a second one carrying the failed ranks' error text
on the failure path only."""

from __future__ import annotations

import pytest
import torch

from spectral_lens import SpectralLens

from support.models import TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 20  # a rank left waiting fails after this
DEADLINE_S = 10.0  # every rank returns or raises well before the timeout
JOIN_S = 300.0


def _model(rank: int, layers: int = 3):
    torch.manual_seed(0)
    return TinyLM(layers=layers).double()


def _built_then_measured(rank: int, model, **kwargs) -> list[float]:
    """Build the lens (a failure is recorded by the case runner) and, if built, measure once."""
    lens = SpectralLens(model, lm_pool(n_batches=4), params=(), progress=False, **kwargs)
    spectra = lens.measure(1, 1).spectra
    return spectra[min(spectra)].values[:3].tolist()


def _layer_missing_on_rank1(rank: int):
    """``layers="h.2"``: rank 1's model has 2 blocks only (h.0, h.1)."""
    return _built_then_measured(rank, _model(rank, layers=3 if rank == 0 else 2), layers="h.2")


def _bad_argument_on_rank1(rank: int):
    """A precision only rank 1 computes wrongly."""
    return _built_then_measured(rank, _model(rank), precision="exact" if rank == 0 else "exakt")


def _built_alike(rank: int):
    """No failure: both ranks build and measure; the same spectrum on both."""
    return _built_then_measured(rank, _model(rank), layers="h.2")


CASES = {"layer_missing_on_rank1": _layer_missing_on_rank1,
         "bad_argument_on_rank1": _bad_argument_on_rank1,
         "built_alike": _built_alike}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("review24_ranks"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="spectral_lens")


@pytest.mark.slow  # one spawn of 2 ranks, three cases: ~15 s on the 2-core CPU
@pytest.mark.distributed
@pytest.mark.parametrize("case, own", [
    ("layer_missing_on_rank1", "ValueError: SpectralLens layers='h.2': "),
    ("bad_argument_on_rank1", "ValueError: SpectralLens: precision must be one of "),
])
def test_a_constructor_error_on_one_rank_stops_every_rank_in_the_constructor(results, case, own):
    got = checked_case(results, case, DEADLINE_S)  # every rank within the deadline, in step afterwards
    errors = [r["error"] for r in got]
    assert errors[1] is not None and errors[1].startswith(own), errors
    assert errors[0] is not None and errors[0].startswith(
        "RuntimeError: SpectralLens: building the lens failed on global rank(s) [1]"), errors
    assert own + errors[1][len(own):][:40] in errors[0], errors  # the failed rank's error, named on rank 0


@pytest.mark.slow
@pytest.mark.distributed
def test_lenses_built_alike_measure_as_before(results):
    got = checked_case(results, "built_alike", DEADLINE_S)
    assert [r["error"] for r in got] == [None, None], got
    assert got[0]["value"] == got[1]["value"], got
