"""Review of ``agree_round``'s failure codes (``spectral_lens._agree``): the FSDP / ZeRO-3 pool rounds carry
``agree``'s NonFinite code in their one ``all_reduce``, so when every failed rank's error is a
``NonFiniteError`` the ranks that did not fail raise a ``NonFiniteError`` too. Before, they raised a
``RuntimeError``: a callback's driver skipped the measurement on the failed rank (training goes on) and ended
the training on the others, the failed rank left alone in the training's next collective.

``agree_counts`` (the gradient pool under FSDP) and ``agree_settings`` are ``agree_round``: they carry it too.
Fast: one process as rank 1 of 2 (a patched ``all_reduce``); slow: 2 gloo ranks, the rounds of an FSDP2
model's measurement through the callbacks' driver."""

from __future__ import annotations

import warnings

import pytest

from spectral_lens import NonFiniteError
from spectral_lens._agree import agree_counts, agree_round, agree_settings

WORLD = 2


@pytest.fixture
def rank1_of_2(monkeypatch):
    """This process as rank 1 of 2 gloo ranks; ``peer``: rank 0's slots (``[count slot, digest slot]``) merged
    in by the patched ``all_reduce(MAX)``; ``peer["calls"]``: the all_reduces made."""
    import torch.distributed as dist

    peer = {"slots": [1, 0], "calls": 0}

    def all_reduce(t, op=None, group=None):
        assert op == dist.ReduceOp.MAX and t.numel() == 2 * WORLD
        peer["calls"] += 1
        t[0], t[WORLD] = max(int(t[0]), peer["slots"][0]), max(int(t[WORLD]), peer["slots"][1])

    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "get_rank": lambda group=None: 1, "get_world_size": lambda group=None: 2,
                        "get_backend": lambda group=None: "gloo", "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return peer


def test_a_nonfinite_failure_on_the_other_rank_is_a_nonfinite_error_here(rank1_of_2):
    """Rank 0 failed with a NonFiniteError (count slot 0, code 2): this rank raises a NonFiniteError naming it,
    from agree_round and agree_counts (before: a RuntimeError); another error (code 1) stays a RuntimeError."""
    rank1_of_2["slots"] = [0, 2]
    with pytest.raises(NonFiniteError, match=r"loading failed on global rank\(s\) \[0\]"):
        agree_round(None, 3, 7, None, "loading")
    with pytest.raises(NonFiniteError, match=r"loading failed on global rank\(s\) \[0\]"):
        agree_counts(None, 3, None, "loading")
    rank1_of_2["slots"] = [0, 1]
    with pytest.raises(RuntimeError, match=r"loading failed on global rank\(s\) \[0\]") as info:
        agree_counts(None, 3, None, "loading")
    assert not isinstance(info.value, NonFiniteError)
    assert rank1_of_2["calls"] == 3  # one all_reduce each, none added


def test_this_ranks_own_error_and_the_slots_it_sends(rank1_of_2, monkeypatch):
    """A failed rank raises its own error whatever the other's code, after sending count 0 and its code in its
    digest slot (2: a NonFiniteError, 1: another); a rank that did not fail sends count + 1 and its digest, and
    gets every rank's counts and digests back."""
    import torch.distributed as dist

    sent = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: (sent.append(t.tolist()), real(t, op))[1])
    rank1_of_2["slots"] = [0, 2]
    with pytest.raises(MemoryError, match="own"):
        agree_round(None, 3, 7, MemoryError("own"), "loading")
    with pytest.raises(NonFiniteError, match="own"):
        agree_round(None, 3, 7, NonFiniteError("own"), "loading")
    rank1_of_2["slots"] = [5, 9]
    assert agree_round(None, 3, 7, None, "loading") == ([4, 3], [9, 7])
    assert sent == [[0, 0, 0, 1], [0, 0, 0, 2], [0, 4, 0, 7]]


def test_agree_settings_carries_the_code_too(rank1_of_2):
    """agree_settings is agree_round: a NonFiniteError on the other rank is one here too (no such error arises
    while checking the lens today; the rule is the same for every agreement)."""
    rank1_of_2["slots"] = [0, 2]
    with pytest.raises(NonFiniteError, match=r"checking failed on global rank\(s\) \[0\]"):
        agree_settings(None, {"precision": "'float64'"}, None, "checking")


# ---------------------------------------------------------------- 2 gloo ranks
def _nonfinite_mask_on_rank1(rank):
    """An FSDP2 model's measurement through the callbacks' driver, its unsized pool loaded in rounds
    (agree_round): rank 1's mask_fn finds a non-finite batch and raises a NonFiniteError. Every rank's driver
    skips the measurement with a warning and returns {} (before: rank 1 skipped, rank 0 raised a RuntimeError
    and ended the training, rank 1 left alone in the next collective: the barrier after the case)."""
    from support.fsdp_pools import Unsized, fsdp2, pool

    from spectral_lens import SpectralLens
    from spectral_lens.integrations._driver import LensDriver

    def mask_fn(batch):
        if rank == 1:
            raise NonFiniteError("the batch's embeddings hold NaN")

    lens = SpectralLens(fsdp2(), Unsized(pool(2)), params=(), precision="float64", progress=False, mask_fn=mask_fn,
                        tail_window=(2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = LensDriver(lens, (), 10).measure(1, 10)
    return {"scalars": got, "warned": [str(w.message)[:300] for w in caught if "is skipped" in str(w.message)]}


def _other_error_on_rank1(rank):
    """agree_round itself: rank 1 failed with another error; rank 0 raises a RuntimeError, as before."""
    agree_round(None, 1, 5, KeyError("own") if rank == 1 else None, "loading")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_skip_alike_when_one_ranks_pool_round_is_not_finite(tmp_path):
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, {"nonfinite": _nonfinite_mask_on_rank1, "other": _other_error_on_rank1},
                             WORLD, pg_timeout_s=30, join_s=300, preload="torch.distributed.fsdp")
    for r in checked_case(results, "nonfinite", 20.0):
        assert r["error"] is None, r
        assert r["value"]["scalars"] == {} and len(r["value"]["warned"]) == 1, r
        assert "NaN" in r["value"]["warned"][0] or "global rank(s) [1]" in r["value"]["warned"][0], r
    r0, r1 = (r["error"] for r in checked_case(results, "other", 20.0))
    assert r1 == "KeyError: 'own'", r1
    assert r0.startswith("RuntimeError: SpectralLens: loading failed on global rank(s) [1]"), r0
