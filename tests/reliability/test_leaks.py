"""Resources over a long training run (audit): what a detached lens, a finished callback run or a
refused writer keeps alive or open. Each test measures the leak itself (a weak reference dead after
``gc.collect()``, descriptor and hook counts back to where they started, bounded growth), never time."""

from __future__ import annotations

import gc
import os
import threading
import warnings
import weakref

import pytest
import torch

import spectral_lens as sl
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.records import RecordWarning, RunInfo, RunWriter
from tests.support.models import TinyLM, lm_pool


def _freed(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _model() -> TinyLM:
    return TinyLM(vocab=64, d=16, heads=2, layers=2, dropout=0.0)


# ---- a detached model is freed ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["detach", "two_with_blocks"])
def test_a_model_detached_from_a_lens_is_freed(how):
    """The handle ``lens.attach(model)`` returned kept the model: the lens keeps its current handle
    (``lens._attachment``), so after ``lens.detach()`` a model the user deleted stayed in memory
    until the lens attached again. From the second attach on, the lens's probe had such a handle of
    its own (``probe.attach`` inside ``_bind``), so even leaving ``with lens.attach(model):`` kept the
    model (a sweep or tuner that reuses one lens held one model, its optimizer's parameters
    and all, per lens)."""
    lens = sl.SpectralLens(pool=lm_pool(1, t=8), progress=False)
    model = _model()
    ref = weakref.ref(model)
    if how == "detach":
        lens.attach(model)
        lens.detach()
    else:
        for _ in range(2):
            with lens.attach(model):
                pass
    del model
    assert _freed(ref)
    assert lens.model is None and lens.probe.model is None


def test_a_model_detached_from_a_probe_is_freed():
    """``probe.attach(model)`` then ``probe.detach()``: the probe's handle kept the model."""
    probe = sl.PerSampleGradientProbe(params="h.1.attn.c_proj.weight")
    model = _model()
    ref = weakref.ref(model)
    handle = probe.attach(model)
    probe.detach()
    del model
    assert _freed(ref)
    assert not handle.active and handle.model is None
    handle.remove()  # a stale handle's remove does nothing


def test_an_attached_model_stays_alive_and_its_handle_still_detaches():
    """The weak reference does not free a model the lens is bound to (regression guard)."""
    lens = sl.SpectralLens(pool=lm_pool(1, t=8), progress=False, params=())
    model = _model()
    ref = weakref.ref(model)
    handle = lens.attach(model)
    del model
    gc.collect()
    assert ref() is not None and handle.active and handle.model is ref()
    handle.remove()
    assert lens.model is None and _freed(ref)


# ---- a lens that a callback attached is freed -------------------------------------------------------


@pytest.mark.parametrize("ended", [True, False])
def test_a_lens_a_callback_attached_is_freed_after_the_run(ended):
    """The callbacks' registry of the attachments they made (a ``WeakKeyDictionary`` keyed by the
    lens) held each attachment strongly, and an attachment refers to its lens: no entry was ever
    dropped, so every lens a callback attached (``SpectralLens(pool=...)`` given to the HF or
    Lightning callback) stayed in memory for the life of the process with its pool, history and
    writer, and, for a run that raised (``ended=False``: its end hook never detached the lens),
    the trained model too."""
    model = _model()
    lens = sl.SpectralLens(pool=lm_pool(1, t=8), progress=False, params=())
    model_ref, lens_ref = weakref.ref(model), weakref.ref(lens)
    driver = LensDriver(lens, [], None)
    driver.bind(model, "test")
    driver.measure(1, 1)
    if ended:
        driver.release()
    del driver, lens, model
    assert _freed(lens_ref)
    assert _freed(model_ref)


def test_a_callback_run_that_raised_is_still_reattached():
    """With the registry's attachments held weakly, a lens left bound by a run that raised is still
    re-attached by the next run's callback (regression guard)."""
    lens = sl.SpectralLens(pool=lm_pool(1, t=8), progress=False, params=())
    first, second = _model(), _model()
    LensDriver(lens, [], None).bind(first, "test")  # the run raised: never released
    driver = LensDriver(lens, [], None)
    driver.bind(second, "test")
    assert lens.model is second
    driver.release()
    assert lens.model is None


# ---- a refused writer leaves no descriptor open -----------------------------------------------------


def test_a_resume_failing_on_the_truncated_line_warning_leaves_no_descriptor_open(tmp_path):
    """``RunWriter(resume=True)`` on a run whose last line was cut warns while it opens the file;
    under ``-W error`` (pytest's ``filterwarnings = error``) the warning is an exception, and the
    append descriptor it had just opened was never closed: one descriptor lost per attempt."""
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=1.0)
    with open(run / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 2, "tok')
    before = _open_fds()
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RecordWarning)
            with pytest.raises(RecordWarning, match="truncated last line"):
                RunWriter(run, resume=True, fsync=False)
    assert _open_fds() == before
    with pytest.warns(RecordWarning, match="truncated last line"):
        RunWriter(run, resume=True, fsync=False).close()  # and the lock was released
    assert _open_fds() == before


def test_writers_opened_refused_and_closed_leave_no_descriptor_open(tmp_path):
    """Regression guard: open, write, close, a refused second writer and a refused resume."""
    before = _open_fds()
    for i in range(10):
        with RunWriter(tmp_path / f"r{i}", RunInfo(f"r{i}"), fsync=False) as w:
            w.log(i, i, train_loss=1.0)
            with pytest.raises(RuntimeError, match="another RunWriter"):
                RunWriter(tmp_path / f"r{i}", resume=True, fsync=False)
        with pytest.raises(ValueError, match="resuming run"):
            RunWriter(tmp_path / f"r{i}", RunInfo("other"), resume=True, fsync=False)
    assert _open_fds() == before


# ---- hooks and threads stay bounded (regression guards) ---------------------------------------------


def test_attach_cycles_and_measurements_leave_no_hook_and_one_worker_thread():
    """Many attach/remove cycles of accumulators and lens measurements leave the hook dictionaries as
    they were; ``compute_async`` uses one worker thread however often it is called, also when a job
    raises."""
    model = _model()
    ids = lm_pool(1, t=8)[0][0]
    assert _hooks(model) == 0
    for _ in range(50):
        with sl.attach(model, "h.*") as capture:
            model(ids)
        capture.remove()
    lens = sl.SpectralLens(model, lm_pool(1, t=8), progress=False)
    for step in range(3):
        lens.measure(step, step)
    assert _hooks(model) == 0
    acc = next(iter(capture.accumulators.values()))
    futures = [acc.compute_async() for _ in range(20)] + [sl.ActivationCovarianceAccumulator().compute_async()]
    for f in futures[:-1]:
        f.result()
    with pytest.raises(ValueError, match="at least 2 rows"):
        futures[-1].result()
    assert sum(t.name.startswith("spectral-lens") for t in threading.enumerate()) == 1


# ---- nothing of a measurement stays on the device between measurements ------------------------------


def _held_bytes(probe: sl.PerSampleGradientProbe) -> int:
    rows = sum(r.untyped_storage().nbytes() for blocks in probe._rows.values() for r in blocks)
    grams = sum(g.untyped_storage().nbytes() for g in probe._gram.values() if g is not None)
    return rows + grams + len(probe._chunks)


@pytest.mark.parametrize("fails", [False, True])
def test_the_lens_frees_the_gradient_rows_after_a_measurement(fails):
    """The lens reset its probe at the start of a measurement only: between measurements, that is
    through the whole training in between, it held every row of ``G`` (M x P in float32 per probed
    matrix, on the model's device: 1.2 GB for GPT-2 small's default matrix at M = 512) and the Gram
    matrices, which nothing reads after the spectra were computed; also after a measurement that
    failed. A ``torch.save(model)`` of a model holding its lens pickled them too."""
    model = _model()
    pool = lm_pool(2, t=8)
    if fails:  # the gradient pass fails after its rows were taken: the last batch's targets are floats
        pool = pool + [(pool[0][0][:, :4], pool[0][1][:, :4].float())]
    lens = sl.SpectralLens(model, pool, progress=False)
    if fails:
        with pytest.raises(RuntimeError):  # the cross-entropy refuses float targets
            lens.measure(1, 1)
    else:
        m = lens.measure(1, 1)
        assert m.spectra["grad:h.1.attn.c_proj.weight"].n_rows == 6
    assert lens.probe.n_samples_ == 0 and _held_bytes(lens.probe) == 0
