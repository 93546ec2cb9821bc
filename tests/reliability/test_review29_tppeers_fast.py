"""Review 29 (tppeers), fast: :func:`check_same_forwards` carrying a failure of this rank from before the pass
into the peers' check (and a peer's to this rank), and the settings that differ named with each rank's value; this
process as rank 0 of 2 peers (global ranks 4 and 5) with the patched ``torch.distributed`` of
``test_review28_tpagree_fast``. ``test_review29_tppeers.py`` runs them on 2 gloo ranks (slow)."""

from __future__ import annotations

import pytest
import torch
from reliability import test_review28_tpagree_fast as tp28

from spectral_lens._agree import CAUSE_BYTES
from spectral_lens._tensor_parallel import PEERS_BEFORE, _settings_items, check_same_forwards
from spectral_lens._warnings import NonFiniteError

pytestmark = pytest.mark.distributed
GROUP = tp28.GROUP
peer = tp28.peer  # the fixture


def _peer_failed(cause: str):
    """The other peer failed before its check: its settings slot -1 (negated: 1), then its error's text."""
    def theirs(t):
        out = torch.full_like(t, -1e9)
        if t.dim() == 2:
            out.zero_()
            mine = cause.encode()
            out[1, :len(mine)] = torch.tensor(list(mine), dtype=out.dtype)
        else:
            out[5] = 1.0
        return out
    return theirs


def test_this_ranks_failure_goes_into_the_check_and_its_text_after_it(peer):
    error = OSError("the pool's index could not be read")
    with pytest.raises(OSError) as got:
        check_same_forwards(None, GROUP, error=error)
    assert got.value is error
    assert [tuple(c.shape) for c in peer["calls"]] == [(6,), (2, CAUSE_BYTES)]
    assert float(peer["calls"][0][2]) == -1.0  # the settings slot: failed (a CRC-32 is >= 0)
    text = bytes(int(b) for b in peer["calls"][1][0] if b).decode()
    assert text == "OSError: the pool's index could not be read"


def test_a_peers_failure_before_its_check_stops_this_rank_naming_it_and_quoting_it(peer):
    peer["peer"] = _peer_failed("TypeError: step and tokens must be integers")
    with pytest.raises(RuntimeError, match=rf"SpectralLens: {PEERS_BEFORE.replace('(', '.').replace(')', '.')} failed "
                                           r"on global rank\(s\) \[5\] \(global rank 5: TypeError: step and tokens "
                                           r"must be integers\); this rank stopped too"):
        check_same_forwards(4, GROUP, settings="chunk_size=4")
    assert [tuple(c.shape) for c in peer["calls"]] == [(6,), (2, CAUSE_BYTES)]


def test_a_peers_nonfinite_error_is_a_nonfinite_error_here(peer):
    peer["peer"] = _peer_failed("NonFiniteError: the covariance is not finite")
    with pytest.raises(NonFiniteError, match=r"global rank 5: NonFiniteError: the covariance is not finite"):
        check_same_forwards(4, GROUP, settings="chunk_size=4")


def test_peers_alike_make_one_all_reduce_and_no_more(peer):
    check_same_forwards(4, GROUP, settings="chunk_size=4")  # the peer sends zeros: MAX keeps this rank's values
    assert [tuple(c.shape) for c in peer["calls"]] == [(6,)]


def test_the_settings_text_is_read_back_item_by_item():
    text = ("autocast_dtype=None, params=() (no gradient protocol), pick=a.b; probe: chunk_size=4, "
            "engines=[('lm_head.weight', 'gram'), ('x', 'y')], label_smoothing=0")
    assert _settings_items(text) == {
        "autocast_dtype": "None", "params": "() (no gradient protocol)", "pick": "a.b", "probe.chunk_size": "4",
        "probe.engines": "[('lm_head.weight', 'gram'), ('x', 'y')]", "probe.label_smoothing": "0"}
