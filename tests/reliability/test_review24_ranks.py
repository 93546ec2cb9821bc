"""An error in ONE rank's ``SpectralLens`` constructor is agreed by every rank (``_agree.built_together``): the
constructor ends with one ``all_reduce`` of a failure flag per rank, and a second one carrying the failed ranks'
error text on the failure path only. Fast tests simulate the second rank in this process (a patched
``torch.distributed``); ``test_review24_ranks_gloo.py`` runs 2 gloo ranks (slow)."""

from __future__ import annotations

import pytest
import torch

from spectral_lens import SpectralLens
from spectral_lens._agree import CAUSE_BYTES, out_of_step
from spectral_lens.spectra.moments import PRECISIONS

from support.models import TinyLM, lm_pool

pytestmark = pytest.mark.distributed


@pytest.fixture
def peer(monkeypatch):
    """This process as rank 0 of 2 (gloo); ``state["peer"]``: a function of this rank's tensor giving the other
    rank's, merged in by the patched ``all_reduce`` as MAX; ``state["calls"]``: the tensors all-reduced (as
    sent); ``state["rank"]``: this rank in the group (-1: not a member)."""
    import torch.distributed as dist

    state = {"calls": [], "peer": None, "rank": 0}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.clone())
        if state["peer"] is not None:
            t.copy_(torch.maximum(t, state["peer"](t)))

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: state["rank"],
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def _lens(**kwargs) -> SpectralLens:
    torch.manual_seed(0)
    return SpectralLens(TinyLM(), lm_pool(n_batches=2), params=(), progress=False, **kwargs)


def _text(row: torch.Tensor) -> str:
    return bytes(b for b in row.tolist() if b).decode()


def _failed_on_rank1(cause: str):
    """The other rank's tensors: its failure flag, then its error's text."""
    def theirs(t):
        out = torch.zeros_like(t)
        if t.dim() == 1:  # the flags
            out[1] = 1
        else:
            mine = cause.encode()
            out[1, :len(mine)] = torch.tensor(list(mine), dtype=out.dtype)
        return out
    return theirs


def test_a_lens_built_in_a_group_makes_one_small_all_reduce(peer):
    lens = _lens()
    assert lens.model is not None
    assert [(c.dtype, c.tolist()) for c in peer["calls"]] == [(torch.int64, [0, 0])]


def test_a_lens_built_in_a_single_process_makes_no_collective(monkeypatch):
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    assert _lens().model is not None


def test_a_rank_outside_the_group_builds_without_a_collective(peer):
    peer["rank"] = -1  # measure refuses it later, as before
    assert _lens().model is not None and peer["calls"] == []


def test_another_ranks_constructor_error_stops_this_rank_naming_it_and_its_error(peer):
    """Before: this rank built its lens and later waited in its first measure's collective until the timeout."""
    peer["peer"] = _failed_on_rank1("ValueError: SpectralLens layers='h.5': no module matches")
    with pytest.raises(RuntimeError, match=r"SpectralLens: building the lens failed on global rank\(s\) \[1\] "
                                           r"\(global rank 1: ValueError: SpectralLens layers='h\.5': no module "
                                           r"matches\); this rank stopped too"):
        _lens()
    assert [c.shape for c in peer["calls"]] == [(2,), (2, CAUSE_BYTES)]
    assert peer["calls"][1].abs().sum() == 0  # this rank sent no text


def test_this_ranks_constructor_error_is_raised_as_is_after_the_agreement(peer):
    """The failed rank raises its own exception, as a single process does, after sending its flag and text."""
    alone = f"SpectralLens: precision must be one of {PRECISIONS}, got 'exakt'"
    with pytest.raises(ValueError) as agreed:
        _lens(precision="exakt")
    assert str(agreed.value) == alone
    flags, text = peer["calls"]
    assert flags.tolist() == [1, 0]
    assert _text(text[0]) == f"ValueError: {alone}" and text[1].abs().sum() == 0


def test_a_long_error_text_is_cut_to_the_limit(peer):
    layers = "h." + "x" * 2 * CAUSE_BYTES
    with pytest.raises(ValueError, match="no module matches"):
        _lens(layers=layers)
    text = peer["calls"][1][0]
    assert (text > 0).sum() == CAUSE_BYTES and _text(text).startswith("ValueError: SpectralLens layers='h.xxx")


def test_a_failed_agreement_raises_this_ranks_own_error_marked_out_of_step(peer):
    """The agreement's collective fails (the other rank is gone): this rank's own error is raised, marked so
    that no later agreement is tried; without an error of its own, the collective's error."""
    import torch.distributed as dist

    def gone(*args, **kwargs):
        raise RuntimeError("gloo: connection closed by peer")

    dist.all_reduce = gone  # (the fixture's monkeypatch restores it)
    with pytest.raises(ValueError, match="precision must be one of") as own:
        _lens(precision="exakt")
    assert out_of_step(own.value)
    with pytest.raises(RuntimeError, match="connection closed by peer") as theirs:
        _lens()  # (a rank that never builds its lens: the process-group timeout's error here, as documented)
    assert out_of_step(theirs.value)
    if hasattr(theirs.value, "add_note"):  # (Python 3.10: the note is a warning)
        assert any("a collective of building the lens failed on global rank 0" in note
                   for note in getattr(theirs.value, "__notes__", [])), theirs.value


def test_attach_is_not_agreed_its_error_raised_on_this_rank_alone(peer):
    """Documented: ``lens.attach(model)`` of a lens built without a model makes no collective; a layer the model
    lacks is raised on this rank alone (the other ranks are not told: bound their wait with the timeout)."""
    lens = SpectralLens(pool=lm_pool(n_batches=2), layers="h.5", params=(), progress=False)
    assert [c.tolist() for c in peer["calls"]] == [[0, 0]]  # the constructor's agreement
    with pytest.raises(ValueError, match="SpectralLens layers='h.5'"):
        lens.attach(TinyLM())
    assert len(peer["calls"]) == 1 and lens.model is None


def test_a_probe_the_lens_attached_is_free_again_when_another_rank_failed(peer):
    """This rank built its lens (attaching the user's ``probe=``), another rank's constructor failed: the
    RuntimeError leaves the probe unbound, as a failed constructor in one process does, so that it can be
    attached again (before the undo: still bound to the model of a lens the user never got)."""
    from spectral_lens import PerSampleGradientProbe

    probe = PerSampleGradientProbe()
    peer["peer"] = _failed_on_rank1("ValueError: boom")
    with pytest.raises(RuntimeError, match=r"global rank 1: ValueError: boom"):
        SpectralLens(TinyLM(), lm_pool(n_batches=2), probe=probe, progress=False)
    assert probe.model is None
    peer["peer"] = None
    assert SpectralLens(TinyLM(), lm_pool(n_batches=2), probe=probe, progress=False).probe is probe
