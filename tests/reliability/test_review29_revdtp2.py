"""Review 29 (revdtp2): which global rank ``LensDriver._with_mesh_peers`` tells the tensor-parallel mesh peers failed
(the peers' ``RuntimeError`` names it), on a rank that is not its group's rank 0 (a data-parallel group of 2: this
rank global rank 6, its group's rank 0 global rank 4; the collectives replaced by stand-ins, one process).

Before: any error there was told as the group's rank 0's (only it runs the agreed work), so an interrupt (Ctrl-C)
reaching this rank inside the group's agreement (``agree``), or in ``resumed``'s ``from_rank0``, had the peers name
global rank 4, which did not fail (it returned and went on). Now an interrupt (a ``BaseException`` that is not an
``Exception``: raised by this rank itself) names this rank; the group's own ``RuntimeError`` (rank 0's work failed)
still names the group's rank 0.
"""

from __future__ import annotations

import pytest
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.integrations import _driver
from spectral_lens.integrations._driver import LensDriver

THIS, GROUP_RANK0 = 6, 4


@pytest.fixture
def told(monkeypatch) -> list:
    """The values this rank gives its mesh peers' ``all_reduce`` (``peers_max``), as a rank of a group of 2 that is
    not the group's rank 0."""
    got = []

    def peers_max(model, group, values):
        got.append(tuple(values))
        return tuple(values)

    monkeypatch.setattr(_driver, "peers_max", peers_max)
    monkeypatch.setattr(_driver, "ranks", lambda group: (1, 2))
    monkeypatch.setattr(_driver, "global_rank", lambda group, rank: GROUP_RANK0 if rank == 0 else THIS)
    monkeypatch.setattr(_driver, "_this_rank", lambda: THIS)
    return got


def _driver_of() -> LensDriver:
    return LensDriver(sl.SpectralLens(TinyGPT(), lm_pool(1, batch=4, t=12, vocab=37), params=(), progress=False),
                      (), None)


def _raising(exc):
    def f(*args, **kwargs):
        raise exc

    return f


def test_an_interrupt_in_the_groups_agreement_names_this_rank_to_the_mesh_peers(told, monkeypatch):
    monkeypatch.setattr(_driver, "agree", _raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _driver_of()._agreed_on_rank0(lambda: None, "recording the training loss (rank 0 writes it)")
    assert told == [(1 + THIS,)]  # before: (1 + GROUP_RANK0,), a rank that did not fail


def test_an_interrupt_in_resumeds_broadcast_names_this_rank_to_the_mesh_peers(told, monkeypatch):
    monkeypatch.setattr(_driver, "agree", lambda *args, **kwargs: None)
    monkeypatch.setattr(_driver, "from_rank0", _raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _driver_of().resumed(3)
    assert told == [(1 + THIS, 0, 0)]


def test_the_groups_failure_still_names_the_groups_rank_0_to_the_mesh_peers(told, monkeypatch):
    """The group's agreement raised (``RuntimeError``): its rank 0's work failed, the rank the peers name."""
    group_error = RuntimeError("SpectralLens: recording the training loss failed on global rank(s) [4]")
    monkeypatch.setattr(_driver, "agree", _raising(group_error))
    with pytest.raises(RuntimeError, match=r"global rank\(s\) \[4\]"):
        _driver_of()._agreed_on_rank0(lambda: None, "recording the training loss (rank 0 writes it)")
    assert told == [(1 + GROUP_RANK0,)]


def test_a_mesh_peers_failure_is_named_in_this_ranks_error(told, monkeypatch):
    """No error here; the peers' maximum says global rank 4 failed: this rank's ``RuntimeError`` names it."""
    monkeypatch.setattr(_driver, "agree", lambda *args, **kwargs: None)
    monkeypatch.setattr(_driver, "peers_max", lambda model, group, values: (1 + GROUP_RANK0, *values[1:]))
    with pytest.raises(RuntimeError, match=r"mesh peer of global rank 6 \(this rank\) or in that peer's group=: "
                                           r"on global rank 4 "):
        _driver_of()._agreed_on_rank0(lambda: None, "recording the validation loss")
