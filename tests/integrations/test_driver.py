"""The callbacks' shared driver: argument errors, one measurement per step, binding."""

from __future__ import annotations

import warnings

import pytest
from torch import nn
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.integrations._driver import LensDriver


def lens(model=None, **kw):
    return sl.SpectralLens(model, lm_pool(1, batch=4, t=12, vocab=37), params=(), **kw)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="expected a spectral_lens.SpectralLens, got dict"):
        LensDriver({}, (), None)
    with pytest.raises(ValueError, match="tokens_per_step must be a positive integer, got 0"):
        LensDriver(lens(), (), 0)
    with pytest.raises(TypeError, match="sink object has no log_measurement"):
        LensDriver(lens(), [object()], None)


def test_due_once_per_scheduled_step_and_tokens():
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    d = LensDriver(lens(model, schedule=sl.Schedule.every(2)), (), 100)
    assert [s for s in range(5) if d.due(s)] == [0, 2, 4]
    scalars = d.measure(2, d.tokens(2))
    assert d.lens.history[-1].tokens == 200 and not d.due(2) and d.due(4)
    assert "spectral_lens/act:transformer.h.1/rankme" in scalars
    assert d.tokens(3, counted=777) == 777
    assert not LensDriver(lens(model), (), None).due(0)  # no schedule: never due


def test_bind_attaches_an_unbound_lens_and_release_detaches_it():
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    d = LensDriver(lens(), (), None)
    d.bind(model, "here")
    assert d.lens.model is model
    d.release()
    assert d.lens.model is None
    bound = LensDriver(lens(model), (), None)
    bound.bind(model, "here")  # the same model: fine
    with pytest.raises(ValueError, match=r"here: the trainer's model \(another TinyGPT instance\) is not the model "
                                         r"the SpectralLens measures \(TinyGPT\)"):
        bound.bind(TinyGPT(), "here")
    with pytest.raises(ValueError, match=r"the trainer's model \(Linear\) is not the model the SpectralLens measures "
                                         r"\(TinyGPT\)"):
        bound.bind(nn.Linear(2, 2), "here")


def test_a_failed_measurement_detaches_and_a_stale_callback_binding_is_replaced():
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)

    def broken(m, batch):
        raise RuntimeError("bad batch")

    d = LensDriver(lens(forward_fn=broken), (), None)
    d.bind(model, "here")
    with pytest.raises(RuntimeError, match="bad batch"):
        d.measure(1, 1)
    assert d.lens.model is None  # the run ends with the error: not left bound to its model
    # a run that raised outside a measurement (its end hook never ran) leaves the lens bound; the next
    # callback run of the same lens attaches it to its own model instead of refusing it
    d.bind(model, "here")
    fresh = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    again = LensDriver(d.lens, (), None)
    again.bind(fresh, "here")
    assert d.lens.model is fresh
    again.bind(fresh, "here")  # bound twice by one run (attach(), then train begin): released once at its end
    again.release()
    assert d.lens.model is None
    # a model the user attached the lens to is theirs: never replaced
    user = lens()
    handle = user.attach(model)
    with pytest.raises(ValueError, match="another TinyGPT instance"):
        LensDriver(user, (), None).bind(fresh, "here")
    assert user.model is model and handle.active


def test_sinks_shade_the_windows_of_the_summaries():
    deep = TinyGPT(vocab=37, d=16, heads=2, layers=24, ctx=12)
    d = LensDriver(lens(deep), (), None)  # no writer: the depth rule of 24 blocks
    assert d.windows() == d.lens._windows() == ((200, 400), (10, 40))
    assert LensDriver(lens(deep, tail_window=(4, 8)), (), None).windows() == ((4, 8), (10, 40))
    seen = []

    class Sink:
        def log_measurement(self, m, tail=None, head=None):
            seen.append((tail, head))

    LensDriver(lens(deep), [Sink()], None).measure(0, 0)
    assert seen == [((200, 400), (10, 40))]


def test_a_measurement_due_after_the_writer_was_closed_is_skipped_with_a_warning(tmp_path):
    """The guides close the run's writer after train(); a later trainer.evaluate() at an unmeasured step
    made the callback measure into it: ValueError 'RunWriter ... is closed' (with an odd max_steps in the
    HF guide's own example). Now that measurement is skipped, with a warning naming the writer."""
    from spectral_lens.records import RunInfo, RunWriter, open_runs

    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    writer = RunWriter(tmp_path / "run", RunInfo("r", total_tokens=1000), fsync=False)
    d = LensDriver(lens(model, writer=writer, schedule=sl.Schedule.every(2)), (), 100)
    assert d.measure(2, d.tokens(2))
    writer.close()
    with pytest.warns(sl.SpectralLensWarning, match=r"RunWriter \(.*run\) is closed, so the measurement due at step 3"):
        assert d.measure(3, d.tokens(3), val_loss=2.5) == {}
    assert [m.step for m in d.lens.history] == [2]
    assert [m.step for m in open_runs([tmp_path / "run"])[0].measurements] == [2]


def test_tokens_that_count_steps_are_warned_about_once(tmp_path):
    """Followed as a new user: a Trainer callback built without ``tokens_per_step`` (and a trainer that
    counts no input tokens) recorded optimizer steps as ``tokens``, silently; the record's
    ``RunInfo.total_tokens`` is a token budget, so the early prediction read every run as barely started."""
    from spectral_lens.records import RunInfo, RunWriter

    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    with RunWriter(tmp_path / "run", RunInfo("r", family="f", batch_tier=1, total_tokens=4096), fsync=False) as w:
        d = LensDriver(lens(model, writer=w), (), None)
        with pytest.warns(sl.SpectralLensWarning, match="record's tokens count optimizer steps.*tokens_per_step="):
            assert d.tokens(3) == 3
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert d.tokens(4) == 4  # once per callback
            assert LensDriver(lens(model, writer=w), (), None).tokens(5, counted=640) == 640  # the trainer's count
            assert LensDriver(lens(model, writer=w), (), 128).tokens(5) == 640
            assert LensDriver(lens(model), (), None).tokens(5) == 5  # no record: history only, no warning
