"""Review 28 (revtp), fast: ``SpectralLens.measure`` with tensor-parallel peers' rounds, in this process as global
rank 4 of the peers [4, 5], its lens's ``group`` the default, a world of this rank alone (one rank of the mesh:
``one_replica`` patched to say so), under a patched ``torch.distributed`` whose ``all_reduce`` over the peers' group merges in the other peer's tensor
(MAX; a peer that agrees on everything). Behaviour, not names: where the last round comes (after the probe's
``compute``), which failures this rank sends to its peer (outside its forwards) and which not (inside one), and
that the peers' settings text has no process-dependent value (lambdas defined alike in two processes).
``test_review28_revtp.py`` runs the same on 2 gloo ranks (slow)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from reliability.test_tensor_parallel import LAYERS, _plain, _pool

import spectral_lens.lens as lens_mod
from spectral_lens import PerSampleGradientProbe, SpectralLens
from spectral_lens._agree import CAUSE_BYTES

pytestmark = pytest.mark.distributed

PEERS = object()  # the peers' process group (the lens's: the default, a world of this rank alone)
RANKS = [4, 5]


@pytest.fixture
def peer(monkeypatch):
    """``state["calls"]``: the tensors this rank sent over the peers' group, in order."""
    import torch.distributed as dist

    state = {"calls": []}

    def all_reduce(t, op=None, group=None):
        assert group is PEERS, "a collective over the lens's own group of one rank"
        state["calls"].append(t.clone())
        if t.dtype == torch.int64 and t.numel() == 4:  # a round: the peer's slots as this rank's
            t[1], t[3] = t[0], t[2]

    for name, value in {
        "is_initialized": lambda: True, "get_rank": lambda group=None: 0,
        "get_world_size": lambda group=None: 2 if group is PEERS else 1, "get_backend": lambda group=None: "gloo",
        "get_process_group_ranks": lambda group: RANKS if group is PEERS else RANKS[:1],
        "get_global_rank": lambda group, r: RANKS[r], "all_reduce": all_reduce,
    }.items():
        monkeypatch.setattr(dist, name, value)
    monkeypatch.setattr(lens_mod, "one_replica", lambda model, group, who="SpectralLens": (False, PEERS))
    return state


def _lens(**kwargs) -> SpectralLens:
    kwargs.setdefault("params", "lm_head.weight")
    return SpectralLens(_plain(), _pool(2), layers=LAYERS, precision="float64", mask_fn=None, progress=False,
                        tail_window=(2, 8), **kwargs)


def _kinds(calls) -> list[str]:
    """Each call as ``settings`` (check_same_forwards), ``round``, ``causes`` or ``layers`` (check_replicated)."""
    out = []
    for c in calls:
        if c.dtype == torch.float64 and c.numel() == 6:
            out.append("settings")
        elif c.dtype == torch.int64 and c.numel() == 4:
            out.append("round")
        elif c.dim() == 2 and c.shape[1] == CAUSE_BYTES:
            out.append("causes")
        else:
            out.append("layers")
    return out


def test_the_gradient_protocols_last_round_comes_after_the_probes_compute(peer):
    lens = _lens()
    compute, at = lens.probe.compute, []

    def recorded(*args, **kwargs):
        at.append(len(peer["calls"]))
        return compute(*args, **kwargs)

    lens.probe.compute = recorded
    lens.measure(1, 1)
    kinds = _kinds(peer["calls"])
    # the activation pass: its settings, a round per batch (2) and one at the end, the check of the layers (2);
    # (review 29: and a round after the activation compute); the gradient protocol: its settings, a round per
    # batch (2), then the probe's compute, then the last round; (review 30: and a round after the record write)
    assert kinds == (["settings"] + ["round"] * 3 + ["layers"] * 2 + ["round"] + ["settings"] + ["round"] * 3
                     + ["round"]), kinds
    assert at == [len(kinds) - 2], at
    assert int(peer["calls"][-2][0]) == 2 + 1  # the last round: the 2 batches agreed, none more


def test_a_compute_failure_of_this_rank_is_sent_to_its_peer(peer):
    lens = _lens()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    lens.probe.compute = broken
    with pytest.raises(RuntimeError, match=r"out of memory \(simulated\)"):
        lens.measure(1, 1)
    assert _kinds(peer["calls"])[-2:] == ["round", "causes"]
    flags, text = peer["calls"][-2:]
    assert flags.tolist()[0] == 0 and flags.tolist()[2] == 1  # failed: count slot 0, code 1
    assert bytes(b for b in text[0].tolist() if b).decode() == "RuntimeError: out of memory (simulated)"


def test_an_attach_failure_is_sent_to_the_peer_and_a_forward_failure_is_not(peer, monkeypatch):
    def attach(*args, **kwargs):
        raise OSError("no such layer (simulated)")

    with monkeypatch.context() as m:
        m.setattr(lens_mod, "attach", attach)
        with pytest.raises(OSError, match="no such layer"):
            _lens(params=()).measure(1, 1)
    assert _kinds(peer["calls"]) == ["settings", "round", "causes"]
    assert peer["calls"][1].tolist()[2] == 1

    peer["calls"].clear()
    seen = []

    def forward_fn(model, batch):  # inside a forward: its peer may wait in its collectives, nothing is sent
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("inside the forward (simulated)")
        return model(batch[0])

    with pytest.raises(RuntimeError, match="inside the forward"):
        _lens(params=(), forward_fn=forward_fn).measure(1, 1)
    assert _kinds(peer["calls"]) == ["settings", "round", "round"]


def _probe_and_mask():
    """A probe with a lambda ``loss_fn`` and a partial ``forward_fn``, and a lambda ``mask_fn``: new objects at
    each call, as in each rank's process."""
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2,
                                   loss_fn=lambda out, b: F.cross_entropy(out.transpose(1, 2), b[1],
                                                                          reduction="none").mean(1),
                                   forward_fn=functools.partial(lambda model, b, k: model(b[k]), k=0))
    return probe, lambda b: torch.ones(b[0].shape, dtype=torch.bool)


def test_the_peers_settings_text_has_no_process_dependent_value(peer):
    texts = []
    for _ in range(2):
        probe, mask_fn = _probe_and_mask()
        lens = SpectralLens(_plain(), _pool(2), layers=LAYERS, probe=probe, precision="float64", mask_fn=mask_fn,
                            pick=lambda out: out, progress=False)
        texts.append(lens._peer_settings(probe=True))
    assert texts[0] == texts[1], texts
    assert "0x" not in texts[0] and " at " not in texts[0], texts[0]  # no address (repr of a function)
    assert "chunk_size=2" in texts[0] and "mask_fn=" in texts[0], texts[0]


def test_in_bounded_memory_mode_the_last_round_follows_the_compute_whose_recomputations_follow_rounds(peer):
    """The compute recomputes the non-resident chunks: forwards, collectives of the mesh. Review 28 gave the last round
    before it (a round sent by a rank whose compute failed would have met its peer's forward), and sent no compute
    failure; review 30 (tpbounded) puts a round before each recomputation and the last one after the compute, so a
    compute failure is sent (``test_review30_tpbounded_fast.py``)."""
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2, max_resident_samples=2)
    lens = _lens(params=None, probe=probe)
    compute, at, forwards = probe.compute, [], []

    def recorded(*args, **kwargs):
        at.append(len(peer["calls"]))
        return compute(*args, **kwargs)

    probe.compute = recorded
    lens.model.register_forward_hook(lambda *args: forwards.append(len(peer["calls"])))
    lens.measure(1, 1)
    kinds = _kinds(peer["calls"])
    assert kinds[-2:] == ["round", "round"], kinds  # the last round, after the compute; the record's (review 30)
    assert at and at[0] < len(kinds) - 2, at
    assert at[0] < forwards[-1] <= len(kinds) - 2, forwards  # the recomputation's forwards, in the compute
    assert kinds[forwards[-1] - 1] == "round", kinds  # each after a round

    peer["calls"].clear()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2, max_resident_samples=2)
    probe.compute = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        _lens(params=None, probe=probe).measure(1, 1)
    assert _kinds(peer["calls"])[-2:] == ["round", "causes"], _kinds(peer["calls"])


def test_an_empty_or_capped_gradient_pool_and_a_second_measurement_keep_the_rounds_in_step(peer):
    # capped mid-batch (6 of 2 x 4 samples: batches of 4 and 2): a round per batch, then the last one
    lens = _lens(gradient_samples=6)
    lens.measure(1, 1)
    first = _kinds(peer["calls"])
    counts = [int(c[0]) - 1 for c in peer["calls"][-4:-1]]  # (the last round: the record's, review 30)
    assert first[-5:] == ["settings"] + ["round"] * 4 and counts == [1, 2, 2], (first, counts)
    peer["calls"].clear()
    lens.measure(2, 2)  # measuring again: the same collectives, the rounds counted afresh
    assert _kinds(peer["calls"]) == first and [int(c[0]) - 1 for c in peer["calls"][-4:-1]] == counts

    # empty: no sample on either peer, the same ValueError on both (each sends it in the last round, quoted)
    peer["calls"].clear()
    with pytest.raises(ValueError, match=r"the gradient pool gave 0 sample\(s\)"):
        _lens(gradient_pool=[]).measure(1, 1)
    assert _kinds(peer["calls"])[-3:] == ["settings", "round", "causes"], _kinds(peer["calls"])
