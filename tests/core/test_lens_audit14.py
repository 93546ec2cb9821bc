"""Fourteenth audit of the attaching/measuring API: what a lens detaches, what reaches a capture from a
tensor-parallel or nested output, and which of the user's own hooks the measuring passes run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_lens import PerSampleGradientProbe, SpectralLens

from support.models import TinyLM, lm_pool

P = "h.2.attn.c_proj.weight"


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyLM(tied=False, dropout=0.0).double().eval()


def _pool():
    return [tuple(t for t in b) for b in lm_pool()]


def test_lens_detach_leaves_a_probe_the_user_attached_bound():
    model, pool = _model(), _pool()
    probe = PerSampleGradientProbe(params=P)
    mine = probe.attach(model)  # the user's own attachment
    lens = SpectralLens(model, pool, probe=probe, layers="h.1", progress=False)
    m1 = lens.measure(0, 0)
    lens.detach()
    assert probe.model is model and mine.active and list(probe.params) == [P]
    probe.reset().update(pool[0])  # still usable on its own
    assert probe.n_samples_ == pool[0][0].shape[0]
    # a lens built without a model, attached and removed by its handle: the same
    lens2 = SpectralLens(pool=pool, probe=probe, layers="h.1", progress=False)
    with lens2.attach(model):
        m2 = lens2.measure(0, 0)
    assert probe.model is model and mine.active
    np.testing.assert_array_equal(m1.spectra[f"grad:{P}"].values, m2.spectra[f"grad:{P}"].values)
    mine.remove()  # the user's handle still unbinds it
    assert probe.model is None


def test_lens_detach_unbinds_the_probes_it_bound_or_built():
    model, pool = _model(), _pool()
    probe = PerSampleGradientProbe(params=P)  # unattached: the lens attaches it, and detaches it
    lens = SpectralLens(model, pool, probe=probe, layers="h.1", progress=False)
    assert probe.model is model
    lens.detach()
    assert probe.model is None
    handle = lens.attach(model)  # bound again by the lens, so unbound again by its handle
    assert probe.model is model
    handle.remove()
    assert probe.model is None and lens.model is None
    built = SpectralLens(model, pool, params=P, layers="h.1", progress=False)
    own = built.probe
    built.detach()
    assert own.model is None
