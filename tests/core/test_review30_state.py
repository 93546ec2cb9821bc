"""Review 30: the accumulator's and the spectrum's saved state under adversarial input.

A rejected load keeps the old state bit for bit; a file that is not what ``save`` wrote is refused naming it
(nothing unpickled); a save that fails keeps the old file and leaves no temporary file; save, load and
going on equals one uninterrupted pass (float64 reference).
"""

from __future__ import annotations

import errno
import io
import os
import threading
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from spectral_lens import ActivationCovarianceAccumulator, Spectrum
from spectral_lens._warnings import SpectrumFormatError, StateFormatError
from support.state import assert_same_state, snapshot


def _acc(seed=0, d=4, precision="float64", **kw) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(d, precision=precision, **kw)
    acc.update(torch.randn(40, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 1e4)
    return acc


def _with_member(src, dst, member: str, data: bytes):
    """A copy of the .npz ``src`` whose ``member`` holds ``data`` (a consistent archive: CRCs recomputed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename == member else zin.read(info))
    return dst


# ---------------------------------------------------------------------------------------------- bugs fixed
@pytest.mark.parametrize("member", ["header.npy", "s.npy"])
def test_a_state_member_that_is_not_an_array_is_refused_naming_the_file(tmp_path, member):
    """numpy hands back a member whose bytes are not an .npy array as bytes: ``load`` raised a bare
    ``AttributeError: 'bytes' object has no attribute 'dtype'`` naming no file for the header."""
    good = _acc().save(tmp_path / "good.npz")
    bad = _with_member(good, tmp_path / "bad.npz", member, b'{"format": "not an array"}')
    with pytest.raises(StateFormatError, match=rf"bad\.npz: member\(s\) \['{member[:-4]}'\] are not NumPy arrays"):
        ActivationCovarianceAccumulator.load(bad)


@pytest.mark.parametrize("member", ["header.npy", "values.npy"])
def test_a_spectrum_member_that_is_not_an_array_is_refused_naming_the_file(tmp_path, member):
    good = Spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 10, 3).save(tmp_path / "good.npz")
    bad = _with_member(good, tmp_path / "bad.npz", member, b"PK not an array")
    with pytest.raises(SpectrumFormatError, match=rf"bad\.npz: member\(s\) \['{member[:-4]}'\] are not NumPy arrays"):
        Spectrum.load(bad)


def _meta(sd):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


@pytest.mark.parametrize("how", ["meta", "sparse s", "sparse m"])
def test_a_state_without_dense_values_is_refused_and_the_old_state_kept(how):
    """A state loaded with ``map_location="meta"`` raised torch's ``Tensor.item() cannot be called on meta
    tensors`` (naming neither the accumulator nor the field); a sparse ``S`` or ``m`` was accepted and the
    next update failed (``Cannot access storage of SparseTensorImpl``)."""
    sd = _acc(seed=2).state_dict()
    bad = {"meta": lambda: _meta(sd), "sparse s": lambda: {**sd, "s": sd["s"].to_sparse()},
           "sparse m": lambda: {**sd, "m": sd["m"].to_sparse()}}[how]()
    live = _acc(seed=1)
    before = snapshot(live)
    with pytest.raises(StateFormatError, match="must be a dense tensor holding values"):
        live.load_state_dict(bad)
    assert_same_state(snapshot(live), before)
    live.update(torch.randn(3, 4, dtype=torch.float64))
    assert live.n_rows == 43


def test_a_loaded_state_is_detached_from_the_callers_graph():
    """The state's tensors are its own: ``clone()`` kept ``requires_grad`` and a graph to the caller's tensors."""
    sd = {k: v.clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
          for k, v in _acc().state_dict().items()}
    acc = ActivationCovarianceAccumulator(4, precision="float64")
    acc.load_state_dict(sd)
    assert not any(v.requires_grad for v in acc.state_dict().values() if isinstance(v, torch.Tensor))


def test_load_state_dict_waits_for_an_update_in_another_thread():
    """``load_state_dict`` takes the lock ``update`` holds (as ``state_dict``, ``merge`` and ``compute`` do): before,
    its attribute stores could interleave with another thread's update commit (rows from one, sums from the other)."""
    acc = _acc(seed=1)
    sd = _acc(seed=2).state_dict()
    done = threading.Event()
    with acc._lock:  # an update in progress on another thread holds it
        t = threading.Thread(target=lambda: (acc.load_state_dict(sd), done.set()))
        t.start()
        assert not done.wait(0.3)  # blocked until the update ends
    t.join(10)
    assert done.is_set()
    assert_same_state(snapshot(acc), snapshot(_acc(seed=2)))


def test_to_still_moves_the_state_under_the_lock():
    acc = _acc(seed=3)
    before = snapshot(acc)
    assert acc.to("cpu") is acc
    assert_same_state(snapshot(acc), before)


def test_loading_an_empty_state_forgets_the_width_of_the_replaced_rows():
    """An accumulator that inferred its width from rows, given a saved state without rows or width: the rows
    were replaced but their width kept (``dim`` 4, where the saved accumulator and a ``reset()`` have none),
    so ``state_dict()`` differed from what was loaded and rows of another width were refused."""
    empty = ActivationCovarianceAccumulator(precision="float64").state_dict()
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(5, 4, dtype=torch.float64))
    acc.load_state_dict(empty)
    assert acc.state_dict() == empty and acc.dim is None
    acc.update(torch.randn(5, 6, dtype=torch.float64))  # any width, as for the accumulator that was saved
    assert acc.dim == 6
    given = ActivationCovarianceAccumulator(4, precision="float64")  # an explicit width stays, as with reset()
    given.update(torch.randn(5, 4, dtype=torch.float64))
    given.load_state_dict(empty)
    assert given.dim == 4 and not given.initialized


@pytest.mark.parametrize("field, value", [("n", 2**63 - 10), ("updates", 2**63), ("bad_rows", 2**60),
                                          ("first_bad", 2**62), ("n", 2**53 + 1), ("updates", 10**30)])
def test_counts_beyond_2_53_are_refused_and_the_old_state_kept(field, value):
    """Accepted before: a count of ``2**63 - 10`` rows wrapped to a negative ``n_rows`` at the next update, an
    update count of ``2**63`` made the next update with NaN rows raise ``Overflow when unpacking long long``."""
    sd = _acc(seed=2).state_dict()
    bad = {**sd, field: value if field == "updates" else torch.tensor(value)}
    live = _acc(seed=1)
    before = snapshot(live)
    with pytest.raises(StateFormatError, match="2\\*\\*53"):
        live.load_state_dict(bad)
    assert_same_state(snapshot(live), before)


@pytest.mark.parametrize("extra", [{"nonfinte": "skip"}, {"products_overflowed": True}, {"name": "h.3"}])
def test_a_state_dict_with_an_unknown_field_is_refused_as_a_file_with_one_is(extra, tmp_path):
    """A state file with an unknown field was refused, the same state as a dict loaded with the field ignored
    (a misspelled ``nonfinite``, a newer version's flag)."""
    live = _acc(seed=1)
    before = snapshot(live)
    with pytest.raises(StateFormatError, match=rf"unknown field\(s\) \['{next(iter(extra))}'\]"):
        live.load_state_dict({**_acc(seed=2).state_dict(), **extra})
    assert_same_state(snapshot(live), before)


@pytest.mark.parametrize("field", ["m", "s"])
def test_a_zero_row_count_with_nonzero_sums_is_refused(field):
    """Accepted before, and the next rows were added to the stale sums: a wrong spectrum, silently. A state without
    rows (masked or skipped rows only) holds exact zeros."""
    sd = _acc(seed=2).state_dict()
    live = _acc(seed=1)
    before = snapshot(live)
    bad = {**sd, "n": torch.tensor(0), **({"m": torch.zeros(4, dtype=torch.float64)} if field == "s" else {})}
    with pytest.raises(StateFormatError, match="n is 0 but the sums m and S are not zero"):
        live.load_state_dict(bad)
    assert_same_state(snapshot(live), before)


def test_a_state_of_masked_rows_only_loads():
    acc = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip")
    acc.update(torch.full((5, 3), float("nan"), dtype=torch.float64))
    acc.update(torch.randn(5, 3, dtype=torch.float64), mask=torch.zeros(5, dtype=torch.bool))
    back = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip")
    back.load_state_dict(acc.state_dict())
    assert_same_state(snapshot(back), snapshot(acc))


def test_a_count_of_2_53_loads():
    sd = _acc().state_dict()
    acc = ActivationCovarianceAccumulator(4, precision="float64")
    acc.load_state_dict({**sd, "n": torch.tensor(2**53), "updates": 2**53})
    assert acc.n_rows == 2**53


# ------------------------------------------------------------------ rejections keep the old state (guards)
def _mutations(sd):
    f64 = torch.float64
    return {
        "s float16": {**sd, "s": sd["s"].half()},
        "s int": {**sd, "s": sd["s"].long()},
        "s complex": {**sd, "s": sd["s"].to(torch.complex128)},
        "s not square": {**sd, "s": torch.zeros(4, 3, dtype=f64)},
        "d mismatch": {**sd, "dim": 5},
        "n float": {**sd, "n": sd["n"].double()},
        "n negative": {**sd, "n": torch.tensor(-1)},
        "bad_rows negative": {**sd, "bad_rows": torch.tensor(-2)},
        "shift inf": {**sd, "shift": torch.full((4,), float("inf"), dtype=f64)},
        "shift nan": {**sd, "shift": torch.full((4,), float("nan"), dtype=f64)},
        "missing m": {k: v for k, v in sd.items() if k != "m"},
        "other precision": {**sd, "precision": "exact"},
        "other policy": {**sd, "nonfinite": "skip"},
        "updates bool": {**sd, "updates": True},
        "synced int": {**sd, "synced": 1},
        "initialized str": {**sd, "initialized": "yes"},
        "low products str": {**sd, "low_precision_products": "no"},
        "arrays on two devices": {**sd, "m": sd["m"].to("meta")},
        "not a dict": [("format", sd["format"])],
        "another format": {**sd, "format": "spectral-lens/spectrum"},
    }


@pytest.mark.parametrize("case", list(_mutations(_acc().state_dict())))
def test_every_rejected_state_keeps_every_field_bit_for_bit(case):
    live = _acc(seed=1)
    live.update(torch.randn(7, 4, dtype=torch.float64))  # deferred CPU terms pending in the live state
    before = snapshot(live)
    with pytest.raises(StateFormatError, match="cannot load"):
        live.load_state_dict(_mutations(_acc(seed=2).state_dict())[case])
    assert_same_state(snapshot(live), before)


def test_a_state_from_the_exact_mode_is_refused_by_a_fast_accumulator_and_loaded_as_its_own_by_load(tmp_path):
    exact = ActivationCovarianceAccumulator(precision="exact")
    exact.update(torch.randn(30, 5))
    fast = ActivationCovarianceAccumulator(precision="fast")
    fast.update(torch.randn(10, 5))
    before = snapshot(fast)
    with pytest.raises(StateFormatError, match="precision 'exact' differs from this accumulator's 'fast'"):
        fast.load_state_dict(exact.state_dict())
    assert_same_state(snapshot(fast), before)
    back = ActivationCovarianceAccumulator.load(exact.save(tmp_path / "exact"))
    assert back.precision == "exact"
    assert_same_state(snapshot(back), snapshot(exact))


def test_a_load_replaces_the_rows_an_accumulator_holds():
    """Documented: ``load_state_dict`` restores the saved state; rows held before are replaced, not merged."""
    live = _acc(seed=1)
    saved = _acc(seed=2)
    live.load_state_dict(saved.state_dict())
    assert_same_state(snapshot(live), snapshot(saved))


def test_a_loaded_single_row_state_computes_nothing_and_says_why():
    one = ActivationCovarianceAccumulator(precision="float64")
    one.update(torch.randn(1, 3, dtype=torch.float64))
    back = ActivationCovarianceAccumulator(precision="float64")
    back.load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="need at least 2 rows, have 1"):
        back.compute()
    back.update(torch.randn(4, 3, dtype=torch.float64))
    assert back.n_rows == 5


def test_a_torn_accumulator_is_restored_by_a_load():
    """Documented: a state torn by an interrupted in-place update is refused until ``reset()`` or a load."""
    acc = _acc(seed=1)
    saved = _acc(seed=2)
    acc._torn = True  # as an interrupt between the in-place add into S and the stores leaves it
    with pytest.raises(RuntimeError, match="interrupted"):
        acc.state_dict()
    acc.load_state_dict(saved.state_dict())
    assert_same_state(snapshot(acc), snapshot(saved))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch review30-pickle-ran",))


def test_a_pickled_object_array_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _acc().save(tmp_path / "good.npz")
    buf = io.BytesIO()
    np.save(buf, np.array([_Boom()], dtype=object), allow_pickle=True)
    for member in ("m.npy", "header.npy"):
        bad = _with_member(good, tmp_path / f"bad-{member}.npz", member, buf.getvalue())
        with pytest.raises(StateFormatError, match=f"bad-{member}.npz: .*allow_pickle=False"):
            ActivationCovarianceAccumulator.load(bad)
        with pytest.raises(SpectrumFormatError, match=f"bad-{member}.npz"):
            Spectrum.load(bad)
    assert not (tmp_path / "review30-pickle-ran").exists()


@pytest.mark.parametrize("cut", [0, 30, 0.5, -22, -1])
def test_a_truncated_state_or_spectrum_file_is_refused_naming_it(tmp_path, cut):
    for name, path, load, err in [
            ("state", _acc().save(tmp_path / "state.npz"), ActivationCovarianceAccumulator.load, StateFormatError),
            ("spec", _acc().compute().save(tmp_path / "spec.npz"), Spectrum.load, SpectrumFormatError)]:
        data = path.read_bytes()
        n = int(len(data) * cut) if isinstance(cut, float) else cut if cut >= 0 else len(data) + cut
        bad = tmp_path / f"cut-{name}.npz"
        bad.write_bytes(data[:n])
        with pytest.raises(err, match=f"cut-{name}.npz"):
            load(bad)


def test_a_symlinked_state_file_loads_and_a_symlinked_directory_is_refused(tmp_path):
    acc = _acc()
    (tmp_path / "link.npz").symlink_to(acc.save(tmp_path / "real.npz"))
    assert_same_state(snapshot(ActivationCovarianceAccumulator.load(tmp_path / "link.npz")), snapshot(acc))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dirlink.npz").symlink_to(tmp_path / "dir")
    with pytest.raises(StateFormatError, match="dirlink.npz: is a directory"):
        ActivationCovarianceAccumulator.load(tmp_path / "dirlink.npz")


# ---------------------------------------------------------------------------- faults during save (guards)
def _enospc(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("what", ["state", "spectrum"])
def test_a_full_disk_during_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, where, what):
    old, new = _acc(seed=1), _acc(seed=2)
    if what == "spectrum":
        old, new = old.compute(), new.compute()
    path = old.save(tmp_path / "saved.npz")
    before = path.read_bytes()
    if where == "write":
        import numpy.lib.format as fmt
        monkeypatch.setattr(fmt, "write_array", _enospc)
    else:
        monkeypatch.setattr(os, where, _enospc)
    with pytest.raises(OSError) as info:
        new.save(path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.npz"]
    loaded = (Spectrum if what == "spectrum" else ActivationCovarianceAccumulator).load(path)
    if what == "state":
        assert_same_state(snapshot(loaded), snapshot(old))


# ------------------------------------------------------------------------------- round trips (guards)
def _chunks(x: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(x))), len(x)]
    return [x[a:b] for a, b in zip(edges, edges[1:])]


def _reference_cov(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    c = x - x.mean(0)
    return c.T @ c / (len(x) - 1)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 12), n=st.integers(8, 160), cuts=st.lists(st.integers(1, 159), max_size=8),
       split=st.integers(0, 9), precision=st.sampled_from(["exact", "fast", "float64"]),
       offset=st.sampled_from([0.0, 1e4]), decay=st.sampled_from([0.0, 6.0]), via_file=st.booleans(),
       seed=st.integers(0, 2**16))
@example(d=2, n=43, cuts=[1, 2], split=2, precision="exact", offset=0.0, decay=0.0, via_file=False, seed=0)  # last bits differ
def test_save_load_and_go_on_equals_one_pass(tmp_path_factory, d, n, cuts, split, precision, offset, decay,
                                              via_file, seed):
    """Chunkings, split points, mean offsets of 1e4 and spectra spread over 6 decades: the resumed accumulator
    equals the saved one going on bit for bit, the uninterrupted one (which never read its state) to the last bits
    (a read applies the CPU updates' deferred re-shift terms: exploration found d=2, chunks of 1, 1 and 11 rows,
    split after 2, differing in the last bit; api-core.md claimed bit-identity), and the float64 reference."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -decay / 2, d)  # eigenvalues spread over `decay` decades
    x64 = rng.standard_normal((n, d)) * scales + offset + rng.standard_normal(d)
    x = torch.from_numpy(x64) if precision == "float64" else torch.from_numpy(x64).float()
    chunks = _chunks(x, cuts)
    split = min(split, len(chunks))
    full = ActivationCovarianceAccumulator(precision=precision)
    first = ActivationCovarianceAccumulator(precision=precision)
    for c in chunks:
        full.update(c)
    for c in chunks[:split]:
        first.update(c)
    if via_file:
        resumed = ActivationCovarianceAccumulator.load(first.save(tmp_path_factory.mktemp("s") / "state"))
    else:
        resumed = ActivationCovarianceAccumulator(precision=precision)
        resumed.load_state_dict(first.state_dict())
    for c in chunks[split:]:
        resumed.update(c)
        first.update(c)
    assert torch.equal(resumed.covariance(), first.covariance())
    scale = full.covariance().abs().max()
    assert (resumed.covariance() - full.covariance()).abs().max() <= 1e-14 * scale
    ref = _reference_cov(x.double().numpy())
    tol = {"float64": 1e-10, "exact": 1e-4, "fast": 1e-4}[precision]  # fp32 rows around a 1e4 mean: ~1e-7 each
    err = np.abs(resumed.covariance().numpy() - ref).max() / max(np.abs(ref).max(), 1e-300)
    assert err < tol, err


@settings(max_examples=15, deadline=None)
@given(n1=st.integers(2, 60), n2=st.integers(2, 60), d=st.integers(2, 8), seed=st.integers(0, 2**16),
       loaded_first=st.booleans())
def test_a_loaded_and_a_live_accumulator_merge_as_one_pass(tmp_path_factory, n1, n2, d, seed, loaded_first):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n1, d)) + 1e4, rng.standard_normal((n2, d)) * 3 - 1e4
    saved = ActivationCovarianceAccumulator(precision="float64")
    saved.update(torch.from_numpy(a))
    loaded = ActivationCovarianceAccumulator.load(saved.save(tmp_path_factory.mktemp("m") / "a.npz"))
    live = ActivationCovarianceAccumulator(precision="float64")
    live.update(torch.from_numpy(b))
    merged = loaded.merge(live) if loaded_first else live.merge(loaded)
    ref = _reference_cov(np.concatenate([a, b]))
    assert merged.n_rows == n1 + n2
    assert np.allclose(merged.covariance().numpy(), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
