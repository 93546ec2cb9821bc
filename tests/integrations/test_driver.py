"""The callbacks' shared driver: argument errors, one measurement per step, binding."""

from __future__ import annotations

import pytest
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
    with pytest.raises(ValueError, match="here: the trainer's model .* is not the model the SpectralLens measures"):
        bound.bind(TinyGPT(), "here")


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
