"""Review 29: the note for a pool of single samples (``_pools.single_sample_hint``) on the FSDP path too. Under FSDP
(and one tensor-parallel replica) the lens runs its forwards in agreed rounds (``SpectralLens._forwards_in_rounds``),
which did not add the note: a list of 1-D token rows failed with the model's bare ``IndexError`` there, with the note
in a single process. 2 gloo CPU ranks, FSDP2, one spawn (slow tier)."""

from __future__ import annotations

import sys

import pytest
from support.fsdp_pools import fsdp2, gloo, ok, pool
from support.ranks import run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 2
NOTE = "gave a first batch whose tensors have at most one dimension"


def _single_samples(rank):
    """A pool of single 1-D token rows (the items of a dataset, not batches): each rank's first forward fails."""
    rows = [x[i] for x, _ in pool(2) for i in range(x.shape[0])]
    try:
        SpectralLens(fsdp2(), rows, params=(), progress=False).measure(1, 1)
    except Exception as exc:  # noqa: BLE001 - the model's own error, with its notes
        return {"type": type(exc).__name__, "notes": list(getattr(exc, "__notes__", []))}
    return None


def _batches(rank):
    """The same rows as batches: measured, no error."""
    return SpectralLens(fsdp2(), pool(2), params=(), progress=False).measure(1, 1).spectra["act:transformer.h.1"].n_rows


CASES = {"single_samples": _single_samples, "batches": _batches}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_gloo_cases(tmp_path_factory.mktemp("hint29"), CASES, WORLD, pg_timeout_s=20, join_s=300.0,
                          preload="spectral_lens")


@gloo
@pytest.mark.skipif(sys.version_info < (3, 11), reason="BaseException.add_note is Python 3.11+")
def test_a_pool_of_single_samples_under_fsdp_fails_with_the_note_on_every_rank(results):
    assert not results["_hung"], results["_hung"]
    for rank, got in enumerate(ok(results, "single_samples")):
        assert got is not None, f"rank {rank}: a pool of 1-D rows measured without an error"
        assert any(NOTE in n and "DataLoader(pool, batch_size=8)" in n for n in got["notes"]), (rank, got)


@gloo
def test_a_pool_of_batches_under_fsdp_has_no_note_and_measures(results):
    assert ok(results, "batches") == [96, 96]
