"""A framework callback's measurement that finds non-finite hidden states or gradients (a run that diverged)
is skipped with a warning on every rank; the training goes on as it would without the callback. Before, the
lens's NonFiniteError ended the user's training run (a Trainer keeps training on a NaN loss by itself).

Across ranks the skip must be agreed: the lens agrees every failure with one all_reduce of a code per rank,
and a rank that did not fail raises a NonFiniteError (not a RuntimeError) when every failed rank's error was
one, so each rank's callback skips alike and none is left in a collective."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens import NonFiniteError
from spectral_lens._agree import agree
from spectral_lens.integrations._driver import LensDriver


def _lens(model, **kw):
    return sl.SpectralLens(model, lm_pool(2, batch=4, t=12, vocab=37), progress=False, tail_window=(2, 8), **kw)


@pytest.mark.parametrize("params", [(), None])  # activations only; activations and the gradient probe
def test_a_measurement_of_a_diverged_model_is_skipped_and_the_next_one_measures(params, tmp_path):
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12).train()
    kw = {} if params is None else {"params": params}
    writer = RunWriter(tmp_path / "run", RunInfo("r"), fsync=False, tail_window=(2, 8))
    d = LensDriver(_lens(model, writer=writer, **kw), (), 100)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    # after the attention: a NaN in c_attn's query weights is not carried through by every CPU
    # scaled_dot_product_attention kernel (one returned finite rows for an all-NaN query)
    w = model.get_parameter("transformer.h.0.attn.c_proj.weight")
    good = w.detach().clone()
    with torch.no_grad():
        w[0, 0] = float("nan")
    with pytest.warns(sl.SpectralLensWarning, match="measurement at step 2 is skipped .*training goes on"):
        assert d.measure(2, d.tokens(2)) == {}
    assert d.lens.history == [] and d.last_step is None
    assert RunRecord.open(tmp_path / "run").measurements == []  # nothing recorded for the skipped step
    assert all(m.training for m in model.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with torch.no_grad():
        w.copy_(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.SpectralLensWarning)
        scalars = d.measure(4, d.tokens(4))
    fresh = LensDriver(_lens(model, **kw), (), 100).measure(4, 400)
    assert scalars and scalars == fresh
    assert [m.step for m in d.lens.history] == [4]
    writer.close()
    assert [m.step for m in RunRecord.open(tmp_path / "run").measurements] == [4]


def test_other_errors_still_end_the_run():
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    d = LensDriver(_lens(model, params=(), forward_fn=lambda m, b: (_ for _ in ()).throw(RuntimeError("boom"))), (),
                   100)
    with pytest.raises(RuntimeError, match="boom"):
        d.measure(2, 200)


@pytest.fixture
def rank1_of_2(monkeypatch):
    """This process as rank 1 of 2 gloo ranks; ``peer[0]``: rank 0's code in the agreement's flags."""
    import torch.distributed as dist

    peer = [0]

    def all_reduce(t, op=None, group=None):
        t[0] = max(int(t[0]), peer[0])

    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "get_rank": lambda group=None: 1, "get_world_size": lambda group=None: 2,
                        "get_backend": lambda group=None: "gloo", "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return peer


def test_a_rank_that_did_not_fail_raises_a_nonfinite_error_when_the_failed_rank_did(rank1_of_2):
    rank1_of_2[0] = 2  # rank 0 failed with a NonFiniteError (its gradient pass: rank 0 alone runs it)
    with pytest.raises(NonFiniteError, match=r"the gradient pass failed on global rank\(s\) \[0\]"):
        agree(None, None, "the gradient pass")
    rank1_of_2[0] = 1  # another error: as before
    with pytest.raises(RuntimeError, match=r"failed on global rank\(s\) \[0\]") as info:
        agree(None, None, "the gradient pass")
    assert not isinstance(info.value, NonFiniteError)
    rank1_of_2[0] = 2
    with pytest.raises(MemoryError):  # this rank's own other error: its own, whatever rank 0's
        agree(None, MemoryError("own"), "the gradient pass")
    rank1_of_2[0] = 0
    agree(None, None, "the gradient pass")  # nobody failed


def _nan_gradients_on_rank0(rank):
    """2 gloo ranks: the gradient pass (rank 0 alone runs it) finds NaN losses; every rank's driver skips the
    measurement with a warning and returns {} (the barrier after the case shows the ranks in step)."""
    from support.models import TinyLM
    from support.models import lm_pool as tiny_pool

    torch.manual_seed(0)
    model = TinyLM().double()
    probe = sl.PerSampleGradientProbe(model, "h.2.attn.c_proj.weight", forward_fn=lambda m, b: m(b[0]) * float("nan"))
    lens = sl.SpectralLens(model, tiny_pool(n_batches=4), probe=probe, progress=False, tail_window=(2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = LensDriver(lens, (), 10).measure(1, 10)
    return {"scalars": got, "warned": [str(w.message)[:120] for w in caught if "is skipped" in str(w.message)]}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_skip_alike_when_rank0s_gradient_pass_is_not_finite(tmp_path):
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, {"nan": _nan_gradients_on_rank0}, 2, pg_timeout_s=30, join_s=240,
                             preload="torch")
    for r in checked_case(results, "nan", 20.0):
        assert r["error"] is None, r
        assert r["value"]["scalars"] == {} and len(r["value"]["warned"]) == 1, r
