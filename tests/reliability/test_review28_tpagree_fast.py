"""Review 28 (tpagree), fast: the tensor-parallel peers' rounds (``_tensor_parallel.PeerRounds``) and their
comparison of the settings (``check_same_forwards``), this process as rank 0 of 2 peers (global ranks 4 and 5)
with a patched ``torch.distributed`` whose ``all_reduce`` merges in the other peer's tensor (MAX).
``test_review28_tpagree.py`` and ``test_review28_tpagree_dp.py`` run them on 2 and 4 gloo ranks (slow)."""

from __future__ import annotations

import pytest
import torch

from spectral_lens._agree import CAUSE_BYTES, mark_out_of_step
from spectral_lens._tensor_parallel import PeerRounds, check_same_forwards

pytestmark = pytest.mark.distributed

GROUP = object()  # the peers' process group (only passed through to the patched functions)
RANKS = [4, 5]


@pytest.fixture
def peer(monkeypatch):
    """``state["peer"]``: the other peer's tensor, a function of this rank's (``None``: it sends zeros, as a rank
    that agrees on everything does under MAX with non-negative values); ``state["calls"]``: the tensors sent."""
    import torch.distributed as dist

    state = {"calls": [], "peer": None}

    def all_reduce(t, op=None, group=None):
        assert group is GROUP
        state["calls"].append(t.clone())
        if state["peer"] is not None:
            t.copy_(torch.maximum(t, state["peer"](t)))

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "get_process_group_ranks": lambda group: RANKS,
                        "get_global_rank": lambda group, r: RANKS[r], "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def _same(t):
    """The other peer with the same values as this rank (its own slots in the second half of each row)."""
    out = t.clone()
    if t.dtype == torch.int64 and t.numel() == 4:  # a round: [count 0, count 1, digest 0, digest 1]
        out[1], out[3] = t[0], t[2]
    return out


def _failed(cause: str):
    """The other peer failed: its count slot 0, its code 1, then its error's text."""
    def theirs(t):
        out = torch.zeros_like(t)
        if t.dim() == 2:
            mine = cause.encode()
            out[1, :len(mine)] = torch.tensor(list(mine), dtype=out.dtype)
        else:
            out[3] = 1
        return out
    return theirs


def _batches(n):
    return iter([torch.zeros(2, 3, dtype=torch.int64) for _ in range(n)])


def test_peers_alike_run_one_round_per_batch_and_one_at_the_end(peer):
    peer["peer"] = _same
    rounds = PeerRounds(GROUP, "loading")
    assert len(list(rounds.agreed(_batches(3)))) == 3
    assert [tuple(c.shape) for c in peer["calls"]] == [(4,)] * 4
    # each count slot: 1 + the forwards agreed so far, and this round's batch
    assert [int(c[0]) for c in peer["calls"]] == [2, 3, 4, 4]
    assert not rounds.open


def test_a_peers_failure_stops_this_rank_naming_its_global_rank_what_and_its_error(peer):
    peer["peer"] = _failed("OSError: batch 2 could not be read")
    with pytest.raises(RuntimeError, match=r"SpectralLens: loading failed on global rank\(s\) \[5\] \(global rank 5: "
                                           r"OSError: batch 2 could not be read\); this rank stopped too"):
        next(PeerRounds(GROUP, "loading").agreed(_batches(3)))
    assert [tuple(c.shape) for c in peer["calls"]] == [(4,), (2, CAUSE_BYTES)]
    assert peer["calls"][1].abs().sum() == 0  # this rank sent no text


def test_this_ranks_loading_error_is_raised_as_is_after_sending_it(peer):
    def broken():
        yield torch.zeros(2, 3)
        raise OSError("batch 1 could not be read")

    peer["peer"] = _same
    got = PeerRounds(GROUP, "loading").agreed(broken())
    next(got)
    with pytest.raises(OSError, match="batch 1 could not be read"):
        next(got)
    flags, text = peer["calls"][1:]
    assert flags.tolist()[0] == 0 and flags.tolist()[2] == 1  # failed: count slot 0, code 1
    assert bytes(b for b in text[0].tolist() if b).decode() == "OSError: batch 1 could not be read"


def test_a_failure_outside_the_rounds_joins_the_next_one_and_none_inside_a_forward_or_after_the_end(peer):
    peer["peer"] = _same
    before = PeerRounds(GROUP, "loading")  # e.g. attaching the capture failed before the first round
    before.fail(ValueError("no such layer"))
    assert [tuple(c.shape) for c in peer["calls"]] == [(4,), (2, CAUSE_BYTES)] and not before.open
    assert peer["calls"][0].tolist()[0] == 0
    before.fail(ValueError("again"))  # settled: no second round
    assert len(peer["calls"]) == 2

    inside = PeerRounds(GROUP, "loading")
    next(inside.agreed(_batches(2)))  # the go-ahead: this rank is in the forward now
    inside.fail(RuntimeError("inside the forward"))  # the peer may wait in its collectives: not agreed
    ended = PeerRounds(GROUP, "loading")
    list(ended.agreed(_batches(1)))
    ended.fail(RuntimeError("after the end"))
    marked = PeerRounds(GROUP, "loading")
    marked.fail(mark_out_of_step(RuntimeError("a collective failed"), "x", failed=False))
    assert len(peer["calls"]) == 2 + 1 + 2  # the rounds of inside and ended only


def test_peers_with_other_numbers_of_batches_or_other_shapes_raise_alike(peer):
    peer["peer"] = lambda t: torch.tensor([0, 2, 0, 0])  # the other peer has a batch
    with pytest.raises(ValueError, match=r"the tensor-parallel ranks \[4, 5\] would run different numbers of "
                                         r"forwards \(global rank 4: 0, global rank 5: 1 or more\)"):
        list(PeerRounds(GROUP, "loading").agreed(_batches(0)))
    peer["peer"] = lambda t: torch.tensor([0, 2, 0, 12345])  # a batch, of another structure
    with pytest.raises(ValueError, match=r"would run their forward 0 on batches of other shapes or dtypes"):
        list(PeerRounds(GROUP, "loading").agreed(_batches(1)))


def test_the_peers_compare_their_settings_in_the_same_all_reduce(peer, monkeypatch):
    """One more number in check_same_forwards' one all_reduce; the peer's other chunk_size refused (review 29: naming
    each rank's value, the texts gathered on that failure path)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(
        slice(None), [obj, "chunk_size=8"]))
    check_same_forwards(8, GROUP, settings="chunk_size=16")  # the peer sends zeros: MAX keeps this rank's values
    assert [tuple(c.shape) for c in peer["calls"]] == [(6,)]
    theirs = check_same_forwards.__globals__["zlib"].crc32(b"chunk_size=8")
    peer["peer"] = lambda t: torch.tensor([0, 0, float(theirs), 0, 0, -float(theirs)], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the tensor-parallel ranks \[4, 5\] run the gradient protocol with other "
                                         r"settings \(chunk_size=16 on global rank 4, chunk_size=8 on global rank 5\)"):
        check_same_forwards(8, GROUP, what="gradient samples (gradient_pool)", settings="chunk_size=16")
