"""Rejected loads change nothing; tampered state and spectrum files are refused naming the file;
policies must agree to merge; overflowing products raise the library's non-finite error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator, Spectrum
from spectral_lens._warnings import NonFiniteError, SpectrumFormatError, StateFormatError


def _acc(d=4, seed=0, **kw) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(d, precision="float64", **kw)
    acc.update(torch.randn(40, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 1e4)
    return acc


def _snapshot(acc):
    sd = acc.state_dict()
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _tamper(sd: dict, **changes) -> dict:
    out = dict(sd)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


_DROP = object()


@pytest.mark.parametrize(
    "change",
    [
        dict(s=_DROP),
        dict(n=_DROP),
        dict(s=torch.zeros(3, 3, dtype=torch.float64)),
        dict(m=torch.zeros(4, dtype=torch.complex128)),
        dict(n=torch.tensor(40.0)),
        dict(s=torch.zeros(4, 4, dtype=torch.float16)),
        dict(n=torch.tensor(-1)),
        dict(first_bad=torch.tensor(-7)),
        dict(shift=torch.full((4,), float("nan"), dtype=torch.float64)),
        dict(nonfinite="skip"),
        dict(precision="exact"),
        dict(dim="4"),
        dict(updates=-1),
        dict(synced="no"),
        dict(initialized=True, s=_DROP, m=_DROP, n=_DROP, shift=_DROP, bad_rows=_DROP, first_bad=_DROP),
    ],
    ids=lambda c: ",".join(f"{k}={'drop' if v is _DROP else getattr(v, 'dtype', v)}" for k, v in c.items()),
)
def test_rejected_state_leaves_the_live_state_intact(change):
    live = _acc(seed=1)
    before = _snapshot(live)
    bad = _tamper(_acc(seed=2).state_dict(), **change)
    with pytest.raises(StateFormatError, match="cannot load"):
        live.load_state_dict(bad)
    assert _same(_snapshot(live), before)
    live.update(torch.randn(3, 4, dtype=torch.float64))  # still a working accumulator
    assert live.n_rows == 43


def _rewrite(path, drop=(), **arrays):
    """Rewrite an .npz with some members dropped or replaced (header given as a dict)."""
    with np.load(path, allow_pickle=False) as data:
        members = {k: data[k] for k in data.files if k not in drop}
    for k, v in arrays.items():
        members[k] = np.array(json.dumps(v)) if k == "header" else v
    np.savez(path, **members)


@pytest.mark.parametrize(
    "drop,arrays",
    [
        (("m",), {}),
        (("s", "m", "n", "shift", "bad_rows", "first_bad"), {}),  # header says it has rows
        ((), {"n": np.array(40.0)}),
        ((), {"s": np.zeros((4, 4), np.complex128)}),
        ((), {"m": np.zeros(4, np.float16)}),
        ((), {"bad_rows": np.array(-3)}),
        ((), {"extra": np.zeros(2)}),
        ((), {"header": "HEADER:dim=four"}),
        ((), {"header": "HEADER:nonfinite=sometimes"}),
        ((), {"header": "HEADER:updates=1.5"}),
        ((), {"header": "HEADER:surprise=1"}),
        ((), {"header": [1, 2]}),
    ],
)
def test_tampered_state_file_is_refused_naming_the_file(tmp_path, drop, arrays):
    path = _acc(seed=3).save(tmp_path / "state.npz")
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
    if isinstance(arrays.get("header"), str):
        key, value = arrays["header"].removeprefix("HEADER:").split("=")
        arrays["header"] = {**header, key: {"four": "four", "sometimes": "sometimes", "1.5": 1.5, "1": 1}[value]}
    _rewrite(path, drop, **arrays)
    with pytest.raises(StateFormatError, match="state.npz"):
        ActivationCovarianceAccumulator.load(path)


def test_npy_and_directory_are_not_state_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "d.npz").mkdir()
    for p in (tmp_path / "a.npy", tmp_path / "d.npz"):
        with pytest.raises(StateFormatError, match=p.name):
            ActivationCovarianceAccumulator.load(p)


def test_empty_state_round_trips(tmp_path):
    empty = ActivationCovarianceAccumulator(3)
    back = ActivationCovarianceAccumulator.load(empty.save(tmp_path / "e.npz"))
    assert not back.initialized and back.dim == 3


def _spectrum_file(tmp_path, values, **header):
    s = Spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), n_rows=10, dim=3)
    full = {**s.to_dict(), **header}
    path = tmp_path / "s.npz"
    np.savez(path, values=np.asarray(values), header=np.array(json.dumps(full)))
    return path


@pytest.mark.parametrize(
    "values,header",
    [
        ([3.0, 2.0, 1.0], dict(n_rows=-5)),
        ([3.0, 2.0, 1.0], dict(dim=4)),
        ([3.0, 2.0, 1.0], dict(dim=3.0)),
        ([3.0, 2.0, -1.0], {}),
        ([[3.0, 2.0, 1.0]], {}),
        (np.array([3, 2, 1], np.complex128), {}),
        ([3.0, 2.0, 1.0], dict(metadata=[1])),
        ([3.0, 2.0, 1.0], dict(source=7)),
        ([3.0, 2.0, 1.0], dict(kind="eigen")),
    ],
)
def test_tampered_spectrum_file_is_refused_naming_the_file(tmp_path, values, header):
    path = _spectrum_file(tmp_path, values, **header)
    with pytest.raises(SpectrumFormatError, match="s.npz"):
        Spectrum.load(path)


def test_spectrum_npy_nested_header_and_directory_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savez(tmp_path / "n.npz", values=np.zeros(2), header=np.array("[" * 100_000 + "]" * 100_000))
    np.savez(tmp_path / "h.npz", values=np.zeros(2), header=np.zeros(2))
    (tmp_path / "d.npz").mkdir()
    for name in ("a.npy", "n.npz", "h.npz", "d.npz"):
        with pytest.raises(SpectrumFormatError, match=name):
            Spectrum.load(tmp_path / name)


def test_merge_refuses_a_different_nonfinite_policy():
    a, b = _acc(seed=4), _acc(seed=5, nonfinite="skip")
    before = _snapshot(a)
    with pytest.raises(ValueError, match="nonfinite"):
        a.merge(b)
    assert _same(_snapshot(a), before)
    with pytest.raises(ValueError, match="nonfinite"):
        a.merge(ActivationCovarianceAccumulator(4, precision="float64", nonfinite="skip"))


def test_overflowing_products_raise_the_nonfinite_error_naming_the_module():
    acc = ActivationCovarianceAccumulator(precision="exact", name="blocks.3.mlp")
    x = torch.zeros(8, 4)
    x[::2, 0], x[1::2, 0] = 3e38, -3e38  # finite rows whose products overflow float32
    acc.update(torch.randn(8, 4))
    acc.update(x)
    with pytest.raises(NonFiniteError, match=r"blocks\.3\.mlp.*updates #0\.\.#1.*precision='float64'"):
        acc.compute()
    with pytest.raises(NonFiniteError, match="blocks.3.mlp"):
        acc.covariance()
    ok = ActivationCovarianceAccumulator(precision="float64")  # the suggested fix works
    ok.update(x.double())
    assert torch.isfinite(ok.compute().values).all()


@pytest.mark.parametrize("kw", [dict(n_rows=-1, dim=3), dict(n_rows=5, dim=4), dict(n_rows=5, dim=3, neg=True)])
def test_save_refuses_what_load_would_refuse(tmp_path, kw):
    neg = kw.pop("neg", False)
    path = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="negative eigenvalue" if neg else "n_rows" if kw["n_rows"] < 0 else "dim is 4"):
        Spectrum(torch.tensor([3.0, 2.0, -1.0 if neg else 1.0], dtype=torch.float64), **kw)  # refused when built
    s = Spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), n_rows=5, dim=3)
    if neg:  # a frozen Spectrum damaged behind its back: save still refuses it
        object.__setattr__(s, "values", torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64))
    else:
        object.__setattr__(s, "n_rows", kw["n_rows"])
        object.__setattr__(s, "dim", kw["dim"])
    with pytest.raises(SpectrumFormatError, match="s.npz"):
        s.save(path)
    assert list(tmp_path.iterdir()) == []


def test_spectrum_construction_refuses_what_load_refuses():
    """Negative eigenvalues, dim != number of values and bad counts fail when the Spectrum is built,
    with a message naming the field (they used to be accepted and fail only at save)."""
    v = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"negative eigenvalue -1e-12 .*clamp_min\(0\)"):
        Spectrum(torch.tensor([3.0, 2.0, -1e-12], dtype=torch.float64), n_rows=5, dim=3)
    with pytest.raises(ValueError, match="dim is 2 but values has 3 entries"):
        Spectrum(v, n_rows=5, dim=2)
    with pytest.raises(ValueError, match="dim is 4 but values has 3 entries"):
        Spectrum(v, n_rows=5, dim=4)
    for bad in (-1, 2.5, True, "5", None):
        with pytest.raises(ValueError, match="n_rows must be a non-negative integer"):
            Spectrum(v, n_rows=bad, dim=3)
    with pytest.raises(ValueError, match="dim must be a non-negative integer"):
        Spectrum(v, n_rows=5, dim=3.0)
    # integer-like counts are stored as int (numpy / 0-d torch integers), -0.0 and zeros are fine
    s = Spectrum(torch.tensor([1.0, 0.0, -0.0]), n_rows=np.int64(7), dim=torch.tensor(3))
    assert type(s.n_rows) is int and type(s.dim) is int and (s.n_rows, s.dim) == (7, 3)
    assert Spectrum(torch.zeros(0), n_rows=0, dim=0).dim == 0


def test_eigensolver_round_off_negatives_still_build_a_spectrum():
    """Round-off makes eigvalsh of a singular PSD matrix slightly negative; the library's paths clamp
    them, so covariance and weight spectra of rank-deficient inputs still build."""
    from spectral_lens import ActivationCovarianceAccumulator
    from spectral_lens.weights import weight_spectrum

    torch.manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)  # rank 3 in 16 dims
    assert float(torch.linalg.eigvalsh(torch.cov(x.T)).min()) < 0  # the round-off this guards against
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(x)
    spec = acc.compute()
    assert spec.dim == 16 and float(spec.values.min()) >= 0
    w = weight_spectrum(x, "low_rank")
    assert w.dim == 16 and float(w.values.min()) >= 0


def test_save_names_the_metadata_key_that_is_not_json(tmp_path):
    s = Spectrum(torch.tensor([2.0, 1.0]), n_rows=3, dim=2, metadata={"ok": 1, "step": torch.tensor(5)})
    with pytest.raises(TypeError, match=r"Spectrum\.save\(.*x\.npz\): metadata\['step'\] is not JSON-serializable"):
        s.save(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["spectrum", "accumulator"])
@pytest.mark.parametrize("content", [b'{"format": "spectral-lens/run"}\n', b"", b"\xff\xfe garbage"],
                         ids=["json", "empty", "garbage"])
def test_a_file_that_is_not_numpy_is_refused_without_suggesting_pickle(tmp_path, kind, content):
    """np.load's error for a file that is neither .npz nor .npy (run.json given to `inspect` by mistake)
    said it 'contains pickled (object) data' and suggested loading it unsafely with pickle."""
    from spectral_lens import ActivationCovarianceAccumulator, Spectrum
    from spectral_lens._warnings import SpectrumFormatError, StateFormatError

    path = tmp_path / "x.npz"
    path.write_bytes(content)
    load, error = (Spectrum.load, SpectrumFormatError) if kind == "spectrum" else \
        (ActivationCovarianceAccumulator.load, StateFormatError)
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "not a NumPy .npz archive" in message, message
    assert "pickle" not in message, message
