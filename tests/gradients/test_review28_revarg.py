"""Review 28 (revarg): ``PerSampleGradientProbe(label_smoothing=)`` and ``metadata["label_smoothing"]`` under
adversarial use. Rows against float64 references (per-sample ``torch.autograd.grad`` of
``F.cross_entropy(label_smoothing=eps)`` averaged over each sequence) on every engine, both head losses and
bounded-memory mode; a dict and a packed batch; the metadata through a failed update, pickles (also an old one
without the new attributes), Spectrum files; the tensor-parallel settings text; the +inf error's wording."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from support.models import TinyGPT, lm_batch

from spectral_lens import NonFiniteError, Spectrum
from spectral_lens._tensor_parallel import probe_settings
from spectral_lens.gradients import PerSampleGradientProbe

PARAM = "transformer.h.1.attn.c_proj.weight"
EPS = 0.3


def _model(dropout: float = 0.0) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(dropout=dropout).double().eval()


def _reference_gram(model, x, y, eps, name=PARAM) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference: each sequence alone, grad_W of the mean smoothed cross-entropy over its non-ignored
    targets; the Gram matrix of those rows and the losses."""
    w = dict(model.named_parameters())[name]
    rows, losses = [], []
    for m in range(x.shape[0]):
        tok = F.cross_entropy(model(x[m : m + 1])[0], y[m], reduction="none", label_smoothing=eps, ignore_index=-100)
        loss = tok.sum() / (y[m] != -100).sum()
        rows.append(torch.autograd.grad(loss, w)[0].flatten())
        losses.append(loss.detach())
    g = torch.stack(rows)
    return g @ g.T, torch.stack(losses)


def _batch():
    x, y = lm_batch(m=6)
    y[1, :3] = -100
    return x, y


@pytest.mark.parametrize("resident", [None, 2])
@pytest.mark.parametrize("head_loss", ["materialized", "chunked"])
@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_every_engine_head_loss_and_bounded_memory_measure_the_smoothed_loss(monkeypatch, engine, head_loss, resident):
    """Bounded memory (``max_resident_samples=2``, chunks of 2 of 6 samples) recomputes the non-resident chunks in
    ``compute``: with the smoothed loss too."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    x, y = _batch()
    model = _model()
    ref_gram, ref_losses = _reference_gram(model, x, y, EPS)
    probe = PerSampleGradientProbe(model, PARAM, engine=engine, head_loss=head_loss, label_smoothing=EPS,
                                   chunk_size=2, max_resident_samples=resident)
    probe.update((x, y))
    spec = probe.compute()
    assert probe.head_loss_.startswith(head_loss) and probe.engines_[PARAM] == engine
    torch.testing.assert_close(probe.losses_, ref_losses, rtol=1e-12, atol=0)
    assert float((probe.gram(PARAM) - ref_gram).abs().max()) <= 1e-10 * float(ref_gram.abs().max())
    assert spec.metadata["label_smoothing"] == EPS


def test_auto_head_loss_where_chunked_is_faster_and_train_mode(monkeypatch):
    """``head_loss="auto"`` deciding for the chunked head (as on CUDA with the Triton kernels) and
    ``train_mode=True`` (no dropout in this model: the same loss) measure the smoothed loss."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    x, y = _batch()
    model = _model()
    ref_gram, ref_losses = _reference_gram(model, x, y, EPS)
    probe = PerSampleGradientProbe(model, PARAM, label_smoothing=EPS, train_mode=True).update((x, y))
    assert probe.head_loss_.startswith("chunked")
    torch.testing.assert_close(probe.losses_, ref_losses, rtol=1e-12, atol=0)
    assert float((probe.gram(PARAM) - ref_gram).abs().max()) <= 1e-10 * float(ref_gram.abs().max())


def test_autocast_bf16_smoothed_rows_match_the_smoothed_loss_fn():
    """Under autocast (bfloat16 on the CPU) the argument's rows are those of the smoothed ``loss_fn`` in the same
    precision, and differ from the plain loss's by more than that precision's noise."""
    import functools

    from spectral_lens.gradients import causal_lm_loss

    x, y = _batch()
    model = _model().float()
    kw = {"autocast_dtype": torch.bfloat16, "head_loss": "materialized", "keep_matrix": True}
    arg = PerSampleGradientProbe(model, PARAM, label_smoothing=EPS, **kw).update((x, y))
    ref = PerSampleGradientProbe(model, PARAM, loss_fn=functools.partial(causal_lm_loss, label_smoothing=EPS),
                                 **kw).update((x, y))
    plain = PerSampleGradientProbe(model, PARAM, **kw).update((x, y))
    torch.testing.assert_close(arg.matrix(), ref.matrix(), rtol=0, atol=0)
    torch.testing.assert_close(arg.losses_, ref.losses_, rtol=0, atol=0)
    assert not torch.allclose(plain.losses_, arg.losses_, rtol=1e-2)


def test_dict_and_packed_batches_take_the_smoothed_loss_per_document():
    """A Hugging Face dict batch with ``labels`` and a ``DataCollatorWithFlattening`` packed row: each document's
    row is the float64 gradient of its own smoothed mean next-token loss."""
    transformers = pytest.importorskip("transformers")
    from support.models import tiny_hf_llama

    name = "model.layers.1.self_attn.o_proj.weight"
    model = tiny_hf_llama(50)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 50, (n,), generator=g) for n in (5, 9, 4)]
    w = dict(model.named_parameters())[name]
    refs = []
    for d in docs:
        loss = F.cross_entropy(model(input_ids=d[None]).logits[0, :-1], d[1:], label_smoothing=EPS)
        refs.append((torch.autograd.grad(loss, w)[0].flatten(), loss.detach()))
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist()} for d in docs])
    ids = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), -100)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for m, d in enumerate(docs):  # right padding
        ids[m, : len(d)], labels[m, : len(d)], mask[m, : len(d)] = d, d, 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for batch in (packed, padded):
        for head_loss in ("materialized", "chunked"):
            probe = PerSampleGradientProbe(model, name, label_smoothing=EPS, head_loss=head_loss, keep_matrix=True)
            probe.update(batch)
            rows = probe.matrix()
            for m, (row, loss) in enumerate(refs):
                assert float((rows[m] - row).abs().max()) <= 1e-9 * float(row.abs().max()), (head_loss, m)
                assert abs(float(probe.losses_[m] - loss)) <= 1e-12 * float(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload_rows holds rows in host memory from CUDA")
def test_offload_rows_on_cuda_measure_the_smoothed_loss():
    x, y = _batch()
    model = _model().cuda()
    ref_gram, ref_losses = _reference_gram(model, x.cuda(), y.cuda(), EPS)
    probe = PerSampleGradientProbe(model, PARAM, label_smoothing=EPS, offload_rows=True, chunk_size=2)
    probe.update((x, y))
    torch.testing.assert_close(probe.losses_.cpu(), ref_losses.cpu(), rtol=1e-12, atol=0)
    gram = probe.gram(PARAM).cpu()
    assert float((gram - ref_gram.cpu()).abs().max()) <= 1e-10 * float(ref_gram.abs().max())


# --- bounded-memory mode after an integration's block --------------------------------------------------------------


def test_bounded_memory_refuses_recomputing_smoothed_chunks_with_another_loss():
    """Non-resident chunks measured inside ``_trained_loss`` (an integration's smoothing) would be recomputed by
    a later ``compute`` with the loss of that moment: after the block, the plain loss, a Gram matrix of two
    losses' gradients labelled as one. Refused, naming both smoothings."""
    x, y = _batch()
    probe = PerSampleGradientProbe(_model(), PARAM, head_loss="materialized", chunk_size=2, max_resident_samples=2)
    with probe._trained_loss(0.2):
        probe.update((x, y))
        probe.compute()  # inside the block: every block with the smoothed loss
    probe.update((x[:2], y[:2]))  # the plain loss, non-resident: its blocks against the earlier chunks recompute them
    with pytest.raises(RuntimeError, match=r"label smoothing 0\.2.*recomput"):
        probe.compute()


def test_bounded_memory_compute_after_the_block_with_no_new_rows_is_fine():
    """Computed inside the block, the Gram matrix is complete: a ``compute`` after it recomputes nothing."""
    x, y = _batch()
    model = _model()
    ref_gram, _ = _reference_gram(model, x, y, 0.2)
    probe = PerSampleGradientProbe(model, PARAM, head_loss="materialized", chunk_size=2, max_resident_samples=2)
    with probe._trained_loss(0.2):
        probe.update((x, y))
        probe.compute()
    spec = probe.compute()
    assert spec.metadata["label_smoothing"] == 0.2
    assert float((probe.gram(PARAM) - ref_gram).abs().max()) <= 1e-10 * float(ref_gram.abs().max())


# --- metadata -------------------------------------------------------------------------------------------------------


def _neg_inf_bias_model() -> TinyGPT:
    """A -inf bias on a vocabulary entry no target of :func:`_batch` names: the plain loss is finite, the smoothed
    one +inf (a masked vocabulary entry)."""
    model = _model()
    model.lm_head = torch.nn.Linear(16, 37, bias=True).double()
    unused = min(set(range(37)) - set(_batch()[1].flatten().tolist()))
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[unused] = -float("inf")
    return model


def test_a_failed_update_leaves_no_smoothing_in_the_metadata():
    """An update that raises leaves the probe as before the call (update's contract): also the smoothings the
    metadata reports. Before, a failed smoothed update made a later plain spectrum say ``[0.0, 0.2]``."""
    x, y = _batch()
    probe = PerSampleGradientProbe(_neg_inf_bias_model(), PARAM, head_loss="materialized")
    probe.update((x, y))  # the plain loss is finite
    with probe._trained_loss(0.2), pytest.raises(NonFiniteError):
        probe.update((x, y))
    assert probe.n_samples_ == 6
    assert "label_smoothing" not in probe.compute().metadata


def test_the_inf_error_names_the_label_smoothing_argument():
    x, y = _batch()
    probe = PerSampleGradientProbe(_neg_inf_bias_model(), PARAM, head_loss="materialized", label_smoothing=0.1)
    with pytest.raises(NonFiniteError, match=r"label-smoothed \(eps=0\.1, label_smoothing\)"):
        probe.update((x, y))
    probe = PerSampleGradientProbe(_neg_inf_bias_model(), PARAM, head_loss="materialized")
    with probe._trained_loss(0.1), pytest.raises(NonFiniteError, match=r"eps=0\.1, the trainer's"):
        probe.update((x, y))


def test_pickle_and_deepcopy_keep_the_smoothing():
    x, y = _batch()
    probe = PerSampleGradientProbe(_model(), PARAM, head_loss="materialized", label_smoothing=EPS)
    probe.update((x, y))
    for other in (copy.deepcopy(probe), pickle.loads(pickle.dumps(probe))):
        assert other.label_smoothing == EPS and other._label_smoothing == EPS
        other.update((x, y))
        assert other.compute().metadata["label_smoothing"] == EPS
        torch.testing.assert_close(other.losses_[6:], probe.losses_, rtol=0, atol=0)


def test_a_pickle_from_before_label_smoothing_still_updates_and_computes():
    """A probe pickled before ``label_smoothing`` existed (no ``label_smoothing``, ``_label_smoothing``,
    ``_rows_smoothing``) is read as an unsmoothed one: updates, computes, and takes an integration's smoothing."""
    x, y = _batch()
    for head_loss in ("materialized", "auto"):
        probe = PerSampleGradientProbe(_model(), PARAM, head_loss=head_loss)
        probe.update((x, y))
        state = probe.__getstate__()
        for key in ("label_smoothing", "_label_smoothing", "_rows_smoothing"):
            del state[key]
        old = PerSampleGradientProbe.__new__(PerSampleGradientProbe)
        old.__setstate__(state)
        old.update((x, y))
        assert "label_smoothing" not in old.compute().metadata
        with old._trained_loss(0.2):
            old.update((x, y))
        assert old.compute().metadata["label_smoothing"] == [0.0, 0.2]


def test_smoothing_metadata_survives_a_spectrum_file(tmp_path):
    """The run records store spectra as Spectrum files: the float and the list read back as written."""
    x, y = _batch()
    probe = PerSampleGradientProbe(_model(), PARAM, head_loss="materialized", label_smoothing=EPS).update((x, y))
    spec = probe.compute()
    back = Spectrum.load(spec.save(tmp_path / "one"))
    assert back.metadata["label_smoothing"] == EPS
    mixed = PerSampleGradientProbe(_model(), PARAM, head_loss="materialized").update((x, y))
    with mixed._trained_loss(0.1):
        mixed.update((x, y))
    back = Spectrum.load(mixed.compute().save(tmp_path / "two"))
    assert back.metadata["label_smoothing"] == [0.0, 0.1]


def test_tensor_parallel_settings_text_tells_smoothings_apart():
    """Ranks of one tensor-parallel replica run one backward together: with different smoothings their gradients
    would mix two losses. The settings text the peers compare says the smoothing in use (an integration's too)."""
    model = _model()
    plain = PerSampleGradientProbe(model, PARAM, head_loss="materialized")
    smoothed = PerSampleGradientProbe(model, PARAM, head_loss="materialized", label_smoothing=0.1)
    assert probe_settings(plain) != probe_settings(smoothed)
    assert "label_smoothing=0.1" in probe_settings(smoothed)
    with plain._trained_loss(0.1):
        assert probe_settings(plain) == probe_settings(smoothed)


def test_a_lens_with_a_smoothed_probe_records_the_smoothing(tmp_path, capsys):
    """``SpectralLens(probe=PerSampleGradientProbe(..., label_smoothing=eps))``: the run record's gradient spectrum
    reads back ``metadata["label_smoothing"]``, and ``spectral-lens inspect`` shows it."""
    from support.models import lm_pool

    from spectral_lens import SpectralLens
    from spectral_lens.cli import main
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False, tail_window=(4, 16)) as writer:
        lens = SpectralLens(model, lm_pool(2, batch=3, t=10, vocab=37), writer=writer, progress=False,
                            probe=PerSampleGradientProbe(params=PARAM, label_smoothing=EPS))
        lens.measure(1, 1)
    (m,) = RunRecord.open(run).measurements
    grads = [s for s in m.spectra.values() if s.kind == "gradient"]
    assert grads and all(s.metadata["label_smoothing"] == EPS for s in grads)
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0  # the run's summary: no metadata shown, nothing to choke on
    (path,) = [p for p in run.rglob("*") if p.is_file() and "c_proj" in p.name]
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0  # one spectrum file: its metadata, the smoothing among it
    assert '"label_smoothing": 0.3' in capsys.readouterr().out


def test_a_copied_chunked_probe_measures_its_own_models_head():
    """The chunked head loss is a closure over the head module it was decided on: a deep copy kept it (functions
    are copied by reference), so a copied model's probe measured with the original model's head weights, and a
    pickle failed ("Can't pickle local object"). A copy decides its head loss again on its own model."""
    x, y = _batch()
    model = _model()
    model.probe = PerSampleGradientProbe(model, PARAM, head_loss="chunked", label_smoothing=EPS)
    model.probe.update((x, y))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(1.5)  # the copy trains on
    twin.probe.reset().update((x, y))
    _, ref_losses = _reference_gram(twin, x, y, EPS)
    assert twin.probe.head_loss_.startswith("chunked")
    torch.testing.assert_close(twin.probe.losses_, ref_losses, rtol=1e-12, atol=0)
    back = pickle.loads(pickle.dumps(model.probe))
    back.update((x, y))
    torch.testing.assert_close(back.losses_[6:], model.probe.losses_, rtol=1e-12, atol=0)
    assert back.compute().metadata["label_smoothing"] == EPS
