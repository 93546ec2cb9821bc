"""Costs over long runs and large sweeps (audit): what a record, a measurement or an eigen-solve costs
must not grow with the run's history, and must not copy a d x d matrix more often than needed. Each
test counts (system calls, bytes, allocations), never time."""

from __future__ import annotations

import os

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.records import RecordFormatError, RunInfo, RunRecord, RunWriter


def _spec(d=16, k=1.0):
    return Spectrum(torch.logspace(0, -3, d, dtype=torch.float64) * k, n_rows=4 * d, dim=d)


def _run(path, n, layers=3):
    with RunWriter(path, RunInfo("r", total_tokens=1000 * n), fsync=False) as w:
        for step in range(n):
            w.log(step, 100 * step, train_loss=1.0)
            w.log_measurement(step, 100 * step, {f"act:blocks.{i}": _spec() for i in range(layers)}, val_loss=1.0)
    return path


class _CountStat:
    """Counts ``os.stat`` calls (``Path.is_file``/``exists``, ``os.path.isfile`` all make one)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = os.stat

        def stat(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)


# ---- reading a long run -----------------------------------------------------------------------------


def test_opening_a_run_stats_no_spectrum_file_one_by_one(tmp_path, monkeypatch):
    """``RunRecord.open`` built a ``Path`` and ran a ``stat`` for every spectrum of every measurement to
    check its file exists: 12,000 of them for 1,000 measurements of 12 layers, 0.8 s of the 1.3 s an
    open took on the project's 2-core machine (and the CLI opens every run of a sweep). One listing of
    ``spectra/`` now answers for the writer's files: the number of ``stat`` calls of an open no longer
    grows with the number of measurements."""
    short, long = _run(tmp_path / "short", 4), _run(tmp_path / "long", 40)
    counts = []
    for path in (short, long):
        stats = _CountStat(monkeypatch)
        record = RunRecord.open(path)
        counts.append(stats.n)
        monkeypatch.undo()
        assert len(record.measurements) == (4 if path == short else 40)
    assert counts[0] == counts[1], counts


def test_a_spectrum_file_missing_from_the_listing_is_still_checked_on_its_own(tmp_path, monkeypatch):
    """A file written after the listing (a writer still appending), or named outside ``spectra/``, is
    checked with its own ``stat``; a file that is gone is still refused, naming its line."""
    run = _run(tmp_path / "run", 5)
    from spectral_lens.records import reader

    monkeypatch.setattr(reader, "_spectrum_listing", lambda root: frozenset())
    assert len(RunRecord.open(run).measurements) == 5
    monkeypatch.undo()
    victim = sorted((run / "spectra").iterdir())[7]  # measurement 3 (1-based line 3), its second layer
    victim.unlink()
    with pytest.raises(RecordFormatError, match=rf"line 3: spectrum file .*{victim.name}.* is missing"):
        RunRecord.open(run)
    (run / "spectra" / victim.name).mkdir()  # a directory by that name is no spectrum file either
    with pytest.raises(RecordFormatError, match=rf"line 3: spectrum file .*{victim.name}.* is missing"):
        RunRecord.open(run)


# ---- writing a long run -------------------------------------------------------------------------------


def test_appending_costs_the_same_after_a_long_history(tmp_path, monkeypatch):
    """Regression guard: ``log`` and ``log_measurement`` write their own line and spectrum files only
    (bytes written and files opened per append do not grow with the lines already in the run)."""
    written, opened = [0], [0]
    real_write, real_open = os.write, os.open

    def write(fd, data):
        written[0] += len(data)
        return real_write(fd, data)

    def open_(*args, **kwargs):
        opened[0] += 1
        return real_open(*args, **kwargs)

    with RunWriter(tmp_path / "run", RunInfo("r", total_tokens=10**6), fsync=False) as w:
        costs = []
        for step in range(60):
            monkeypatch.setattr(os, "write", write)
            monkeypatch.setattr(os, "open", open_)
            written[0] = opened[0] = 0
            w.log(step, 10 * step, train_loss=1.0, time=0.0)
            w.log_measurement(step, 10 * step, {"act:blocks.0": _spec(), "act:blocks.1": _spec()}, val_loss=1.0)
            monkeypatch.undo()
            costs.append((written[0], opened[0]))
    # the step's digits and the clock's are in the lines: at most a few bytes apart
    assert max(c[0] for c in costs[10:]) - min(c[0] for c in costs[10:]) <= 40, costs
    assert len({c[1] for c in costs}) == 1, costs


# ---- the d x d matrices of an eigen-solve ------------------------------------------------------------


class _CountNewSquares:
    """Counts the operations that return a new ``(d, d)`` tensor (a fresh allocation, not an in-place
    or ``out=`` result, not a view of an input)."""

    def __init__(self, d: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.n = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ptrs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor)}
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and tuple(t.shape) == (d, d) \
                            and t.untyped_storage().data_ptr() not in ptrs:
                        counter.n += 1
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _exact_reference(x: torch.Tensor) -> torch.Tensor:
    xc = x.double() - x.double().mean(0)
    return (xc.t() @ xc) / (x.shape[0] - 1)


def test_the_covariance_and_the_mirror_allocate_two_d_by_d_matrices_each():
    """``covariance_from_moments`` allocated six d x d matrices (``m m^T``, its quotient, the difference,
    the covariance, the sum with its transpose, the half of it) with up to three alive beside ``S`` at
    once, and ``mirror_lower`` three: at d = 4096 (128 MiB each) ``compute()`` peaked at 3.9 d x d
    matrices beyond the accumulator's state. Each now allocates two; the values are the same bits
    (checked against the old expressions) and match a float64 reference."""
    from spectral_lens.spectra.moments import covariance_from_moments, mirror_lower

    d = 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64) + 5.0
    shift = x[0].clone()
    xs = x - shift
    n, m, s = torch.tensor(300), xs.sum(0), xs.t() @ xs
    lower = s.tril() + torch.triu(torch.full((d, d), float("nan"), dtype=torch.float64), 1)
    with _CountNewSquares(d) as count:
        cov = covariance_from_moments(n, m, s)
    assert count.n == 2
    with _CountNewSquares(d) as count:
        mirrored = mirror_lower(lower)
    assert count.n == 2
    n64 = n.double()
    old_cov = (s - torch.outer(m, m) / n64) / (n64 - 1)
    assert torch.equal(cov, 0.5 * (old_cov + old_cov.t()))
    assert torch.equal(mirrored, s.tril() + s.tril(-1).t())
    ref = _exact_reference(x)
    assert torch.allclose(cov, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    assert torch.equal(mirrored, mirrored.t())
    # float32 sums (not what the accumulator keeps) still promote as before
    cov32 = covariance_from_moments(n, m.float(), s)
    old32 = (s - torch.outer(m.float(), m.float()) / n64) / (n64 - 1)
    assert cov32.dtype == torch.float64 and torch.equal(cov32, 0.5 * (old32 + old32.t()))


def test_compute_allocates_a_bounded_number_of_d_by_d_matrices():
    """``compute()`` of an accumulator after CPU updates (its ``S`` valid in the lower triangle, re-shift
    terms deferred): the mirror, the covariance and the solve's input, counted; equal to a float64
    reference solve."""
    import spectral_lens as sl

    d = 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, d, generator=g) * torch.logspace(0, -2, d) + torch.linspace(-3, 3, d)
    acc = sl.ActivationCovarianceAccumulator()
    for chunk in x.split(64):
        acc.update(chunk)
    with _CountNewSquares(d) as count:
        spec = acc.compute()
    # addmm of the deferred terms, the mirror (2), the covariance (2); eigvalsh copies inside LAPACK
    assert count.n <= 5, count.n
    ref = torch.linalg.eigvalsh(_exact_reference(x)).flip(0).clamp_min(0)
    assert torch.allclose(spec.values, ref, rtol=1e-5, atol=1e-6 * float(ref[0]))


def _live_squares(d: int) -> int:
    import gc

    storages = {o.untyped_storage().data_ptr() for o in gc.get_objects()
                if issubclass(type(o), torch.Tensor) and tuple(o.shape) == (d, d) and o.dtype == torch.float64}
    return len(storages)


def test_compute_async_lets_its_copy_of_the_state_go_before_the_solve(monkeypatch):
    """``compute_async`` copies ``S`` (the training may go on updating the accumulator) and mirrors the
    copy on the worker; the job kept the unmirrored copy alive through the covariance and the solve,
    one d x d matrix more than needed (at d = 2048 the background solve peaked at 5.5 matrices beyond
    the state, now 3.4, by the peak RSS). Counted here: the float64 d x d matrices alive when the solve
    starts, beyond the accumulator's own: the mirrored copy and the covariance."""
    import spectral_lens as sl
    from spectral_lens import _compute

    d = 24
    live: list[int] = []
    real = _compute.eigenvalues_descending

    def solve(sym):
        live.append(_live_squares(d))
        return real(sym)

    monkeypatch.setattr(_compute, "eigenvalues_descending", solve)
    x = torch.randn(256, d, generator=torch.Generator().manual_seed(2)) + 2.0
    acc = sl.ActivationCovarianceAccumulator()
    for chunk in x.split(32):
        acc.update(chunk)
    before = _live_squares(d)
    values = acc.compute_async().result().values
    assert live[0] - before <= 2, (before, live)
    assert torch.equal(values, acc.compute().values)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_finiteness_check_of_a_square_allocates_no_square(bad):
    """``all_finite`` (the covariance's, the solve's and the probe's Gram check) reads the smallest and
    largest entries; ``torch.isfinite(t).all()`` allocated a float copy and three bool masks of ``t``."""
    from spectral_lens.spectra.eigen import all_finite

    d = 32
    for dtype in (torch.float64, torch.float32):
        t = torch.randn(d, d, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 1e30
        if bad is not None:
            t[d - 1, 5] = bad
        with _CountNewSquares(d) as count:
            finite = all_finite(t)
        assert count.n == 0
        assert finite == bool(torch.isfinite(t).all()) == (bad is None)
    assert all_finite(torch.empty(0, 4))


# ---- a measurement's summaries --------------------------------------------------------------------------


@pytest.mark.parametrize("head_window", [(10, 40), None])
def test_a_lens_with_a_writer_summarizes_each_spectrum_once(tmp_path, monkeypatch, head_window):
    """``SpectralLens.measure`` computed every spectrum's summaries, then ``RunWriter.log_measurement``
    computed the same ones again with the same windows (18 ms per d = 4096 spectrum on the 2-core CPU,
    twice per layer per measurement). The lens now hands its summaries over when its windows are the
    writer's; the record holds the same values. A writer recorded without a head window keeps its own
    (no ``alpha_head``), computed by the writer as before."""
    import spectral_lens as sl
    from spectral_lens import lens as lens_module
    from spectral_lens.records import writer as writer_module
    from tests.support.models import TinyLM, lm_pool

    calls = [0]

    def counted(real):
        def summaries(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)
        return summaries

    monkeypatch.setattr(lens_module, "spectrum_summaries", counted(lens_module.spectrum_summaries))
    monkeypatch.setattr(writer_module, "spectrum_summaries", counted(writer_module.spectrum_summaries))
    model = TinyLM(vocab=64, d=16, heads=2, layers=2, dropout=0.0)
    with RunWriter(tmp_path / "run", RunInfo("r", n_layer=2, total_tokens=10**4), fsync=False,
                   tail_window=(2, 8), head_window=head_window) as w:
        lens = sl.SpectralLens(model, lm_pool(2, t=8), layers="all", writer=w, progress=False)
        m = lens.measure(1, 100)
    assert len(m.spectra) == 3  # two blocks and the gradient spectrum
    assert calls[0] == (3 if head_window else 6), calls[0]
    stored = RunRecord.open(tmp_path / "run").measurements[0].summaries
    if head_window:
        assert stored == m.summaries
    else:
        assert not any("alpha_head" in s for s in stored.values())
        assert {n: {k: v for k, v in s.items() if not k.startswith("alpha_head")} for n, s in m.summaries.items()} \
            == stored
