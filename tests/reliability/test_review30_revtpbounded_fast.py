"""Review 30 (revtpbounded), fast: the probe's ``_around_recompute`` hook (review 30, tpbounded: the lens's round of a
tensor-parallel rank's mesh peers before each recomputation in bounded-memory mode) and copies of the probe.

* A probe pickled before that review has no ``_around_recompute``: its bounded-memory ``compute`` (which recomputes
  its non-resident chunks) raised ``AttributeError`` (now read as ``None``, as other fields of older pickles are).
* A copy (``copy.deepcopy``, pickle) of a probe made while the lens's hook is set (a model keeping its probe as an
  attribute, copied from a forward hook during a recomputation or from another thread) took the hook along: a pickle
  failed on it (the lens's ``PeerRounds.forward`` holds a process group), a deep copy copied it or failed, and a copy
  holding it would run the original lens's peers' rounds in its own ``compute``. Now the copy has none.
* Regression guards: the lens resets the hook on every path out of its compute (an error, a Ctrl-C), so a direct
  ``probe.compute()`` afterwards runs no round; the rounds come one per recomputation (a chunk is recomputed once per
  panel of ``max_resident_samples`` rows: more rounds than non-resident chunks).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from reliability.test_review28_revtp_fast import _kinds, _lens, peer  # noqa: F401 (a fixture)
from torch import nn

import spectral_lens.gradients.probe as probe_mod
from spectral_lens import PerSampleGradientProbe


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(11, 8), nn.Linear(8, 8), nn.Linear(8, 11)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.emb(x))))


def _bounded_probe():
    """A float64 probe in bounded-memory mode holding 7 samples, 5 of them in non-resident chunks (recomputed)."""
    torch.manual_seed(0)
    model = _Tiny().double().eval()
    x, y = torch.randint(0, 11, (7, 5)), torch.randint(0, 11, (7, 5))
    probe = PerSampleGradientProbe(model, ["lin.weight", "head.weight"], chunk_size=1, max_resident_samples=2)
    probe.update((x, y))
    assert sum(not c.resident for c in probe._chunks) == 5  # (this test's premise: recomputations in compute)
    return probe


def _values(spectra) -> dict:
    return {k: s.values.clone() for k, s in spectra.items()}


def test_a_probe_pickled_before_the_hook_existed_still_computes_in_bounded_memory_mode():
    probe = _bounded_probe()
    state = probe.__getstate__()
    state.pop("_around_recompute", None)
    old = PerSampleGradientProbe.__new__(PerSampleGradientProbe)
    old.__setstate__(state)
    got = _values(old.compute())  # before: AttributeError: ... no attribute '_around_recompute'
    want = _values(probe.compute())
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_while_the_lens_hook_is_set_does_not_take_the_hook(how):
    probe = _bounded_probe()
    ran = []

    class _Hook:  # (not picklable, as the lens's PeerRounds.forward, which holds a process group)
        def __call__(self):
            ran.append(1)
            from contextlib import nullcontext
            return nullcontext()

        def __reduce__(self):
            raise TypeError("cannot pickle a process group (simulated)")

    probe._around_recompute = _Hook()
    other = copy.deepcopy(probe) if how == "deepcopy" else pickle.loads(pickle.dumps(probe))  # before: TypeError
    assert other._around_recompute is None  # (a copy's compute runs no round of the original lens's peers)
    assert probe._around_recompute is not None  # the original's is its lens's to reset
    probe.compute()
    assert ran  # the original's hook ran around its recomputations


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
def test_the_lens_resets_the_hook_when_its_compute_fails_and_a_direct_compute_runs_no_round(peer, monkeypatch,
                                                                                             raised):
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=1, max_resident_samples=1)
    lens = _lens(params=None, probe=probe)
    real, seen = probe_mod.PerSampleGradientProbe._chunk_rows, []

    def failing(self, *args, **kwargs):  # the second recomputation fails inside its forwards' block
        seen.append(self._around_recompute)
        if len(seen) == 2:
            raise raised("simulated")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(probe_mod.PerSampleGradientProbe, "_chunk_rows", failing)
    with pytest.raises(raised, match="simulated"):
        lens.measure(1, 1)
    assert seen[0] is not None and probe._around_recompute is None
    monkeypatch.setattr(probe_mod.PerSampleGradientProbe, "_chunk_rows", real)
    lens.measure(2, 1)  # the peer stand-in agrees: in step again
    assert probe._around_recompute is None
    rows = _bounded_probe()  # (its own model: a probe used outside any lens)
    peer["calls"].clear()
    rows.compute()
    assert peer["calls"] == []


def test_one_round_per_recomputation_not_per_non_resident_chunk(peer, monkeypatch):
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=1, max_resident_samples=1)
    lens = _lens(params=None, probe=probe)
    real, recomputed = probe_mod.PerSampleGradientProbe._chunk_rows, []

    def counted(self, *args, **kwargs):
        recomputed.append(len(peer["calls"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(probe_mod.PerSampleGradientProbe, "_chunk_rows", counted)
    compute, at = probe.compute, []

    def recorded(*args, **kwargs):
        at.append(len(peer["calls"]))
        return compute(*args, **kwargs)

    probe.compute = recorded
    lens.measure(1, 1)
    far = sum(not c.resident for c in probe._chunks) if probe._chunks else None
    kinds = _kinds(peer["calls"])
    in_compute = kinds[at[0]:-2]  # the rounds from the compute's start to the last round (then the record's)
    assert len(recomputed) > 0 and in_compute == ["round"] * len(recomputed), (in_compute, recomputed)
    assert far is None or len(recomputed) > far, (far, recomputed)
