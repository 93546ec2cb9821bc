"""Review 30 (tplens), one process, the collectives replaced by stand-ins (as review 29's revdtp2): what
``LensDriver`` tells its tensor-parallel mesh peers (``peers_max``) from a rank that is not its group's rank 0
(a data-parallel group of 2: this rank global rank 6, the group's rank 0 global rank 4).

* The closed-writer decision of ``LensDriver.measure``: before, a failure of its group broadcast (``from_rank0``; a
  Ctrl-C raised as the broadcast returns) raised here without the mesh's all-reduce, which the peers then waited in
  until the process-group timeout (the multi-rank case: ``test_review30_tplens.py``). Now it rides in that
  all-reduce: an interrupt names this rank, the group's own failure the group's rank 0.
* ``resumed(step)`` after a group collective that failed (marked out of step by the agreement, as ``_agree.
  _own_collectives`` marks it: a rank left the group waiting, or died): no collective of the mesh follows (a
  regression guard: it held before), so this rank does not wait in one whose peer may be anywhere, and it raises
  the collective's error itself; where the mesh's all-reduce after an ordinary failure fails too, the original
  error is raised, not the mesh's.
* ``SpectralLens.measure``'s record write (review 28's stand-ins of the mesh): a failed write is sent to the mesh
  peers in one round after it, with its text (before: no round, the peers waited in their next forward); a written
  record ends the measurement with that round (the 2- and 4-rank cases: ``test_review30_tplens.py``, ``_dp.py``).
"""

from __future__ import annotations

import pytest
from reliability.test_review28_revtp_fast import _kinds, _lens, peer  # noqa: F401 (a fixture)
from reliability.test_review29_revdtp2 import (  # noqa: F401 (a fixture)
    GROUP_RANK0,
    THIS,
    _driver_of,
    _raising,
    told,
)

from spectral_lens._agree import mark_out_of_step, out_of_step
from spectral_lens.integrations import _driver

CLOSED = "deciding whether rank 0's run record is closed"


def test_an_interrupt_in_the_closed_writer_broadcast_names_this_rank_to_the_mesh_peers(told, monkeypatch):
    monkeypatch.setattr(_driver, "from_rank0", _raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _driver_of().measure(3, 3)
    assert told == [(1 + THIS, 0)]  # before: [], the peers left waiting in their all-reduce


def test_a_failed_closed_writer_broadcast_names_the_groups_rank_0_to_the_mesh_peers(told, monkeypatch):
    monkeypatch.setattr(_driver, "from_rank0", _raising(RuntimeError("the broadcast failed (simulated)")))
    with pytest.raises(RuntimeError, match="the broadcast failed"):
        _driver_of().measure(3, 3)
    assert told == [(1 + GROUP_RANK0, 0)]


def test_a_mesh_peers_failure_in_the_closed_writer_decision_is_raised_here(told, monkeypatch):
    monkeypatch.setattr(_driver, "from_rank0", lambda *args, **kwargs: False)
    monkeypatch.setattr(_driver, "peers_max", lambda model, group, values: (1 + 9, *values[1:]))
    driver = _driver_of()
    with pytest.raises(RuntimeError, match=rf"{CLOSED} failed on a tensor-parallel mesh peer of global rank 6 "
                                           r"\(this rank\) or in that peer's group=: on global rank 9 "):
        driver.measure(3, 3)
    assert driver.lens.history == []  # nothing measured


@pytest.mark.filterwarnings("ignore:SpectralLens. the tail window")
def test_the_closed_writer_decision_still_skips_alike_and_measures_alike(told, monkeypatch):
    monkeypatch.setattr(_driver, "agree", lambda *args, **kwargs: None)
    monkeypatch.setattr(_driver, "from_rank0", lambda group, value, model=None: value)
    driver = _driver_of()
    monkeypatch.setattr(_driver, "peers_max", lambda model, group, values: (0, 1))  # a peer's writer is closed
    with pytest.warns(Warning, match="is closed, so the measurement due at step 3 is skipped"):
        assert driver.measure(3, 3) == {}
    monkeypatch.setattr(_driver, "peers_max", lambda model, group, values: tuple(values))
    assert driver.measure(4, 4) == {}  # measured (not rank 0: no scalars)
    assert [m.step for m in driver.lens.history] == [4]


def test_resumed_after_a_failed_group_collective_raises_it_without_a_mesh_collective(told, monkeypatch):
    failed = mark_out_of_step(RuntimeError("Connection closed by peer (simulated)"), "dropping the records",
                              failed=False)  # as the agreement's _own_collectives raises it
    monkeypatch.setattr(_driver, "agree", _raising(failed))
    driver, released = _driver_of(), []
    monkeypatch.setattr(driver, "release", lambda: released.append(True))
    with pytest.raises(RuntimeError) as raised:
        driver.resumed(3)
    assert raised.value is failed and out_of_step(raised.value)
    assert told == []  # no all-reduce of the mesh: its peer may be anywhere (a rank that left its group)
    assert released == [True]  # the run ends with this error


def test_resumed_raises_the_groups_error_where_the_mesh_collective_fails_too(told, monkeypatch):
    group_error = RuntimeError("the broadcast failed (simulated)")
    monkeypatch.setattr(_driver, "agree", lambda *args, **kwargs: None)
    monkeypatch.setattr(_driver, "from_rank0", _raising(group_error))
    monkeypatch.setattr(_driver, "peers_max", _raising(RuntimeError("the mesh's all-reduce failed too")))
    with pytest.raises(RuntimeError) as raised:
        _driver_of().resumed(3)
    assert raised.value is group_error


# ----------------------------------------------------------------------------- the record write, in one process
# (review 28's stand-ins: this rank global rank 4 of the mesh peers [4, 5], its lens's group a world of this rank
# alone; the peer agrees on everything)

def _writer(tmp_path, fails: bool):
    from spectral_lens.records import RunInfo, RunWriter

    writer = RunWriter(tmp_path / "run", RunInfo("r", total_tokens=1000), fsync=False, tail_window=(2, 8))
    if fails:
        def log_measurement(*args, **kwargs):
            raise OSError("no space left on device (simulated)")

        writer.log_measurement = log_measurement
    return writer


def test_a_failed_record_write_is_sent_to_the_mesh_peers_quoted(peer, tmp_path):
    with pytest.raises(OSError, match="no space left on device"):
        _lens(params=(), writer=_writer(tmp_path, fails=True)).measure(1, 1)
    assert _kinds(peer["calls"])[-2:] == ["round", "causes"], _kinds(peer["calls"])  # before: not sent
    flags, text = peer["calls"][-2:]
    assert flags.tolist()[0] == 0 and flags.tolist()[2] == 1  # failed: count slot 0, code 1
    assert bytes(b for b in text[0].tolist() if b).decode() == "OSError: no space left on device (simulated)"


def test_a_written_record_ends_the_measurement_with_one_round_of_the_mesh(peer, tmp_path):
    writer = _writer(tmp_path, fails=False)
    _lens(params=(), writer=writer).measure(1, 1)
    assert set(writer.measured_steps()) == {1}
    # the activation pass's rounds, its check of the layers, the round after its compute, then the record's
    assert _kinds(peer["calls"]) == ["settings"] + ["round"] * 3 + ["layers"] * 2 + ["round"] * 2, _kinds(peer["calls"])
    assert peer["calls"][-1].tolist()[0] == 1 and peer["calls"][-1].tolist()[2] == 0  # no forward, no batch digest
