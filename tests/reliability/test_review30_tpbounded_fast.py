"""Review 30 (tpbounded), fast: review 28's stand-in of a tensor-parallel mesh peer (``test_review28_revtp_fast``:
this process as global rank 4 of the peers [4, 5], the lens's ``group`` a world of this rank alone, ``all_reduce``
over the peers' group merging in a peer that agrees on everything).

* Bounded-memory mode (``max_resident_samples``): the probe's ``compute`` recomputes its non-resident chunks, forwards
  that are collectives of the mesh. Before, the pass's last round came before ``compute``, and a failure of this
  rank in it, outside those forwards (replaying a chunk's RNG state, the eigendecomposition, a non-finite Gram), was
  sent to no peer (which waited in its next recomputation forward or the training's next forward until the
  process-group timeout). Now each recomputation follows a round, and the last round follows ``compute``: the failure
  is sent in the peer's next round, quoted (a ``NonFiniteError``'s code where it is one).
* ``PeerRounds.fail``: a Ctrl-C reaching this rank during its round was raised out of it, so the lens skipped its own
  group's agreement (whose other ranks, a (dp, tp) mesh's other replica, waited in it). Now it is held across the
  round and agreed with the group as this rank's error (a ``KeyboardInterrupt`` caused by the failure).

The multi-rank cases: ``test_review30_tpbounded.py`` (2 ranks) and ``test_review30_tpbounded_dp.py`` (4 ranks).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from reliability.test_review28_revtp_fast import _kinds, _lens, peer  # noqa: F401 (a fixture)
from reliability.test_review30_revtplens import python_sigint, sigint_here  # noqa: F401 (a fixture)

import spectral_lens.gradients.probe as probe_mod
import spectral_lens.lens as lens_mod
from spectral_lens import PerSampleGradientProbe
from spectral_lens._warnings import NonFiniteError


def _bounded(**kwargs):
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2, max_resident_samples=2)
    return _lens(params=None, probe=probe, **kwargs), probe


def _in_compute(probe, flag: list) -> None:
    """``flag`` is ``[True]`` while ``probe.compute`` runs."""
    compute = probe.compute

    def flagged(*args, **kwargs):
        flag.append(True)
        try:
            return compute(*args, **kwargs)
        finally:
            flag.clear()

    probe.compute = flagged


def test_each_recomputation_follows_a_round_and_the_last_round_follows_the_compute(peer):
    lens, probe = _bounded()
    flag, before = [], []
    _in_compute(probe, flag)
    lens.model.register_forward_pre_hook(lambda *args: before.append(len(peer["calls"])) if flag else None)
    lens.measure(1, 1)
    kinds = _kinds(peer["calls"])
    calls = [c.tolist() for c in peer["calls"]]
    assert len(before) >= 2, before  # (recomputations: this test's premise)
    recomputed = sorted(set(before))  # the calls made before each recomputation (its forwards: one per chunk)
    n = len(recomputed)
    # the gradient protocol: its settings, a round per batch (2), a round per recomputation, the last round after
    # the compute, then the record's round (review 30); before: the last round before the compute, none in it
    assert kinds[-(n + 5):] == ["settings"] + ["round"] * (2 + n + 1) + ["round"], kinds
    for k, at in enumerate(recomputed):
        assert kinds[at - 1] == "round" and calls[at - 1][0] - 1 == 2 + k + 1, (k, at, calls[at - 1])
    assert calls[-2][0] - 1 == 2 + n, calls[-2]  # the last round: every forward agreed, none more


@pytest.mark.parametrize("where", ["rng", "eigh", "nonfinite"])
def test_a_compute_failure_outside_the_recomputation_forwards_is_sent_to_the_peer(peer, monkeypatch, where):
    lens, probe = _bounded()
    flag = []
    _in_compute(probe, flag)
    if where == "rng":  # replaying the RNG state of the first chunk recomputed
        real = probe_mod.set_rng_state

        def set_rng_state(*args, **kwargs):
            if flag:
                raise RuntimeError("loading a chunk's RNG state failed (simulated)")
            return real(*args, **kwargs)

        monkeypatch.setattr(probe_mod, "set_rng_state", set_rng_state)
        error, match, code = RuntimeError, "RNG state failed", 1
    elif where == "eigh":  # after the recomputations
        def gram_spectrum(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (the eigendecomposition, simulated)")

        monkeypatch.setattr(probe_mod, "gram_spectrum", gram_spectrum)
        error, match, code = RuntimeError, "out of memory", 1
    else:
        def check_grams():
            raise NonFiniteError("the Gram matrix holds NaN/Inf (simulated)")

        monkeypatch.setattr(probe, "_check_grams", check_grams)
        error, match, code = NonFiniteError, "NaN/Inf", 2
    with pytest.raises(error, match=match):
        lens.measure(1, 1)
    assert _kinds(peer["calls"])[-2:] == ["round", "causes"], _kinds(peer["calls"])
    flags, text = peer["calls"][-2:]
    assert flags.tolist()[0] == 0 and flags.tolist()[2] == code, flags  # failed: count slot 0, the error's code
    assert bytes(b for b in text[0].tolist() if b).decode().startswith(f"{error.__name__}: "), text
    assert probe._around_recompute is None  # not kept past the pass


def test_a_failure_inside_a_recomputation_forward_is_not_sent(peer):
    lens, probe = _bounded()
    flag, seen = [], []
    _in_compute(probe, flag)

    def failing(*args):
        if flag:
            seen.append(1)
            raise RuntimeError("inside the recomputation's forward (simulated)")

    lens.model.register_forward_pre_hook(failing)
    with pytest.raises(RuntimeError, match="inside the recomputation"):
        lens.measure(1, 1)
    assert seen == [1] and "causes" not in _kinds(peer["calls"]), _kinds(peer["calls"])
    assert _kinds(peer["calls"])[-1] == "round"  # the round before that forward, then nothing more


def test_without_peers_the_probe_has_no_recomputation_context(monkeypatch):
    """A lens without tensor-parallel peers (a single process): compute runs with none (no collective)."""
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2, max_resident_samples=2)
    lens = _lens(params=None, probe=probe)
    seen = []
    real = probe._chunk_rows

    def chunk_rows(*args, **kwargs):
        seen.append(probe._around_recompute)
        return real(*args, **kwargs)

    probe._chunk_rows = chunk_rows
    lens.measure(1, 1)
    assert seen and set(seen) == {None}, seen


@pytest.mark.parametrize("phase", ["gradient", "activation"])
def test_a_ctrl_c_during_the_failure_round_is_agreed_with_the_lens_group(peer, python_sigint, monkeypatch, phase):
    """A failure after the last forward (the probe's compute; leaving the activation pass's eval mode), and a Ctrl-C
    reaching this rank as that round's first all_reduce returns: before, ``KeyboardInterrupt`` left ``fail`` and the
    group's agreement of that phase was skipped; now it is agreed there, caused by the failure."""
    import torch.distributed as dist

    lens = _lens(params="lm_head.weight" if phase == "gradient" else ())
    if phase == "gradient":
        def broken(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        lens.probe.compute = broken
    else:
        eval_mode = lens._eval_mode

        @contextlib.contextmanager
        def failing():
            with eval_mode():
                yield
            raise RuntimeError("restoring the model's modes failed (simulated)")

        lens._eval_mode = failing
    reduce, armed = dist.all_reduce, [True]

    def all_reduce(t, *args, **kwargs):
        reduce(t, *args, **kwargs)
        if armed and t.dtype == torch.int64 and t.numel() == 4 and t.tolist()[0] == 0:  # this rank's failed round
            armed.clear()
            sigint_here()

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    agreed = []
    real_agree = lens_mod.agree

    def agree(group, error, what, *args, **kwargs):
        agreed.append((what, error))
        return real_agree(group, error, what, *args, **kwargs)

    monkeypatch.setattr(lens_mod, "agree", agree)
    with pytest.raises(KeyboardInterrupt) as raised:
        lens.measure(1, 1)
    assert not armed, "no failed round"
    assert _kinds(peer["calls"])[-2:] == ["round", "causes"], _kinds(peer["calls"])  # both of the round's
    want = "the gradient protocol" if phase == "gradient" else "the activation pass"
    got = [(what, error) for what, error in agreed if what.startswith(want)]
    assert len(got) == 1, agreed  # before: [] (skipped)
    assert isinstance(got[0][1], KeyboardInterrupt) and isinstance(got[0][1].__cause__, RuntimeError), got
    assert isinstance(raised.value.__cause__, RuntimeError), raised.value
