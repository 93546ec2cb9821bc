"""Review 29 (revtppeers), fast: a failed rank's error text for its peers (``_agree._causes``) where the error's
``__str__`` raises (a user's exception class) or its message holds a lone surrogate (a path's undecodable byte,
which UTF-8 cannot encode): before, the text raised on the failed rank before the text's
``all_reduce``, which its peers then waited in until the process-group timeout (``test_review29_revtppeers.py``
on 2 gloo ranks, slow). This process as rank 0 of 2 peers with the patched ``torch.distributed`` of
``test_review28_tpagree_fast``."""

from __future__ import annotations

import pytest
from reliability import test_review28_tpagree_fast as tp28

from spectral_lens._agree import CAUSE_BYTES, agree_round, error_text
from spectral_lens._tensor_parallel import check_same_forwards

pytestmark = pytest.mark.distributed
GROUP = tp28.GROUP
peer = tp28.peer  # the fixture
UNREAD = "Unprintable: (its message could not be read: its __str__ raised)"


class Unprintable(OSError):
    def __str__(self):
        raise AttributeError("no message")


def _text(row) -> str:
    return bytes(int(b) for b in row if b).decode()


def test_an_error_whose_str_raises_is_quoted_by_its_type():
    assert error_text(Unprintable()) == UNREAD
    assert error_text(OSError("disk full")) == "OSError: disk full"
    assert error_text(KeyboardInterrupt()) == "KeyboardInterrupt: "  # as before


@pytest.mark.parametrize("where", ["check_same_forwards", "agree_round"])
def test_its_text_still_goes_into_the_peers_second_all_reduce(peer, where):
    error = Unprintable()
    with pytest.raises(Unprintable) as got:
        if where == "check_same_forwards":  # a failure before the peers' check
            check_same_forwards(None, GROUP, error=error)
        else:  # a failure between rounds (the activation compute's)
            agree_round(GROUP, 0, 0, error, "computing", quote=True)
    assert got.value is error
    assert [tuple(c.shape) for c in peer["calls"]][1:] == [(2, CAUSE_BYTES)]  # before: no second all_reduce
    assert _text(peer["calls"][1][0]) == UNREAD


def test_a_message_utf8_cannot_encode_goes_into_it_escaped(peer):
    """A path's undecodable byte (``os.fsdecode``: a lone surrogate) in the message: before, ``encode()`` raised
    before the second all_reduce."""
    error = ValueError("cannot read /data/\udcff.bin")
    with pytest.raises(ValueError):
        check_same_forwards(None, GROUP, error=error)
    assert [tuple(c.shape) for c in peer["calls"]] == [(6,), (2, CAUSE_BYTES)]
    assert _text(peer["calls"][1][0]) == "ValueError: cannot read /data/\\udcff.bin"
