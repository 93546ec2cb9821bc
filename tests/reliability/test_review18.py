"""Review of the session's merged changes (reviewB): regressions found and fixed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.gradients._measurable import is_encoder_decoder


class _EncDec(nn.Module):
    """An encoder-decoder shaped like SeamlessM4TForTextToText: ``text_encoder``, ``text_decoder`` (no module
    named ``decoder``), ``config.is_encoder_decoder``."""

    def __init__(self, decoder_name: str = "text_decoder"):
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=True)
        self.embed = nn.Embedding(16, 8)
        self.text_encoder = nn.ModuleList([nn.Linear(8, 8)])
        self.add_module(decoder_name, nn.ModuleList([nn.Linear(8, 8)]))
        self.lm_head = nn.Linear(8, 16)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.text_encoder:
            h = layer(h)
        return self.lm_head(h)


@pytest.mark.parametrize("decoder_name", ["decoder", "text_decoder"])
def test_encoder_decoder_with_a_prefixed_decoder_is_still_refused(decoder_name):
    """SeamlessM4TForTextToText names its decoder ``text_decoder``: it was refused with the encoder-decoder
    message before the WhisperEncoder change, then measured with the decoder-only defaults (transformers
    then failed with 'You must specify exactly one of decoder_input_ids or decoder_inputs_embeds')."""
    model = _EncDec(decoder_name)
    assert is_encoder_decoder(model)
    with pytest.raises(ValueError, match="encoder-decoder"):
        sl.SpectralLens(model, [torch.randint(0, 16, (2, 4))], params=())


def test_encoder_alone_is_not_an_encoder_decoder():
    """The encoder alone (WhisperEncoder built from the whole model's config) still fits the defaults."""
    model = _EncDec("text_decoder")
    del model.text_decoder
    assert not is_encoder_decoder(model)


def test_a_run_writer_subclass_overriding_log_measurement_still_gets_the_old_call(tmp_path):
    """A ``RunWriter`` subclass that overrides ``log_measurement`` with the arguments the lens passed before
    (``step, tokens, spectra, val_loss=, progress=, scalars=``), e.g. to mirror each line to a dashboard,
    got ``TypeError: unexpected keyword argument 'summaries'`` once the lens handed its summaries over.
    The record it writes holds the writer's own summaries, equal to the lens's."""
    from spectral_lens.records import RunInfo, RunRecord, RunWriter, spectrum_summaries
    from tests.support.models import TinyLM, lm_pool

    seen = []

    class Mirrored(RunWriter):
        def log_measurement(self, step, tokens, spectra=None, *, val_loss=None, progress=None, scalars=None):
            seen.append(step)
            return super().log_measurement(step, tokens, spectra, val_loss=val_loss, progress=progress,
                                           scalars=scalars)

    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=16, heads=2, layers=2, dropout=0.0)
    with Mirrored(tmp_path / "run", RunInfo("r", n_layer=2, total_tokens=10**4), fsync=False,
                  tail_window=(2, 8)) as w:
        lens = sl.SpectralLens(model, lm_pool(2, t=8), layers="all", params=(), writer=w, progress=False)
        m = lens.measure(1, 100)
    assert seen == [1]
    record = RunRecord.open(tmp_path / "run")
    stored = record.measurements[0].summaries
    assert stored == m.summaries
    for name in m.spectra:  # what the writer computes from the saved spectrum
        assert stored[name] == spectrum_summaries(record.measurements[0].spectra.load(name), (2, 8), (10, 40))


def test_a_complex_parameter_is_refused_as_complex_not_as_quantized():
    """A complex parameter was measured from the real parts of its per-sample gradients (torch's 'Casting
    complex values to real discards the imaginary part' warning only): the spectrum of the wrong rows
    (largest eigenvalue 1420 against 479 of the real-view rows). The quantized-weight refusal then took it
    for a quantized weight. Refused, naming it as complex and the real view to probe."""

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.complex128))

        def forward(self, x):
            return (x.to(torch.complex128) @ self.w.t()).abs()

    with pytest.raises(ValueError, match=r"parameter 'w' is complex \(torch.complex128, shape \(3, 4\)\)") as info:
        sl.PerSampleGradientProbe(Complex(), params=["w"], forward_fn=lambda m, b: m(b),
                                  loss_fn=lambda out, b: out.pow(2).sum(-1))
    assert "quantized" not in str(info.value)
    assert "view_as_complex" in str(info.value)


def test_a_complex_weight_spectrum_is_the_complex_matrix_s():
    """``weight_spectrum`` admits complex weights (``_weight_values``) but converted them to float64, which
    drops the imaginary parts (a torch warning only): the spectrum of the real part. Reference: numpy's
    singular values of the complex128 matrix."""
    import numpy as np

    from spectral_lens.weights import weight_spectrum

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, dtype=torch.complex64, generator=g)
    spec = weight_spectrum(w, "w")
    want = np.linalg.svd(w.to(torch.complex128).numpy(), compute_uv=False) ** 2
    assert spec.values.dtype == torch.float64
    np.testing.assert_allclose(spec.values.numpy(), want, rtol=1e-12)
    nan = w.clone()
    nan[0, 0] = complex(0.0, float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        weight_spectrum(nan, "w")


@pytest.mark.parametrize("hook", ["tensor", "post_accumulate_grad"])
def test_a_lens_measuring_from_inside_a_backward_hook_reads_its_pool(hook):
    """``SpectralLens.measure`` called inside a backward pass (a tensor hook; a post-accumulate-grad hook, as
    an optimizer-step-in-backward loop uses) ran its pool with every forward skipped by the rule for
    activation checkpointing's recomputation: 'h.0: need at least 2 rows, have 0' and a hint about
    torch.compile. The lens's own no-grad pass is never a recomputation: the same spectra as outside."""
    from tests.support.models import TinyLM, lm_pool

    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=16, heads=2, layers=2, dropout=0.0)
    pool = lm_pool(2, t=8)
    lens = sl.SpectralLens(model, pool, layers="all", params=(), progress=False, precision="float64")
    outside = lens.measure(0, 0)
    got = {}

    def measure(*_):
        if not got:
            got["m"] = lens.measure(1, 1)

    logits = model(pool[0][0])
    if hook == "tensor":
        logits.register_hook(measure)
        handle = None
    else:
        handle = model.ln_f.weight.register_post_accumulate_grad_hook(measure)
    logits.pow(2).mean().backward()
    if handle is not None:
        handle.remove()
    assert sorted(got["m"].spectra) == sorted(outside.spectra)
    for name, spec in outside.spectra.items():
        assert got["m"].spectra[name].n_rows == spec.n_rows
        torch.testing.assert_close(got["m"].spectra[name].values, spec.values, rtol=1e-12, atol=0)
