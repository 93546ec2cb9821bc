"""Review of the fourteenth session's merged changes: defects found by adversarial inputs.

Each test failed on the code before its fix (noted per test).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens._warnings import SpectrumFormatError, StateFormatError
from spectral_lens.accumulate import ActivationCovarianceAccumulator


def _patch_central_directory(path: Path, *, flag: int | None = None, method: int | None = None) -> None:
    """Rewrite every central-directory entry of the zip at ``path``: its general-purpose flag bits
    and/or its compression method (what a flipped byte in the entry header does)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    assert at >= 0
    while at >= 0:
        if flag is not None:
            raw[at + 8 : at + 10] = struct.pack("<H", flag)
        if method is not None:
            raw[at + 10 : at + 12] = struct.pack("<H", method)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))


def _spectrum_file(tmp_path: Path) -> Path:
    Spectrum(torch.tensor([3.0, 2.0, 1.0]), n_rows=10, dim=3).save(tmp_path / "s.npz")
    return tmp_path / "s.npz"


def _state_file(tmp_path: Path) -> Path:
    acc = ActivationCovarianceAccumulator()
    acc.update(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))
    acc.save(tmp_path / "a.npz")
    return tmp_path / "a.npz"


DAMAGE = {
    "unknown compression method": dict(method=99),  # zipfile: NotImplementedError
    "encrypted entry": dict(flag=1),  # zipfile: RuntimeError (password required)
    "patched data": dict(flag=1 << 5),  # zipfile: NotImplementedError
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_zip_entry_header_is_a_format_error_naming_the_file(tmp_path, damage):
    # before: zipfile's NotImplementedError / RuntimeError escaped read_npz (its except list named
    # BadZipFile, KeyError, ValueError, OSError, EOFError, RecursionError only), so a spectrum file or
    # accumulator state with one flipped byte raised a raw error instead of the documented one
    spectrum, state = _spectrum_file(tmp_path), _state_file(tmp_path)
    _patch_central_directory(spectrum, **DAMAGE[damage])
    _patch_central_directory(state, **DAMAGE[damage])
    with pytest.raises(SpectrumFormatError, match=r"s\.npz: not readable as a spectral-lens spectrum file"):
        Spectrum.load(spectrum)
    with pytest.raises(StateFormatError, match=r"a\.npz: not readable as an accumulator state file"):
        ActivationCovarianceAccumulator.load(state)


def test_inspect_of_a_damaged_spectrum_file_is_one_line_exit_2(tmp_path):
    # before: a traceback (NotImplementedError) and exit 1
    path = _spectrum_file(tmp_path)
    _patch_central_directory(path, method=99)
    code = "import sys; from spectral_lens.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "inspect", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "s.npz" in done.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "numpy float16"])
def test_a_half_precision_spectrum_keeps_its_default_ranks(dtype):
    # before: the numerical-rank tolerance used the storage dtype's eps (bf16: 7.8e-3) times the size, so
    # every eigenvalue of a 512-wide spectrum was "round-off" and estimate_crossover refused it ("only 0
    # of 512 eigenvalues lie above round-off"; fp16: only 2). No eigensolver computes in half precision:
    # the values are float32/float64 results stored in it, resolved as in float32
    import numpy as np

    from spectral_lens.spectra import estimate_crossover

    j = np.arange(1, 513, dtype=np.float64)
    p = np.where(j < 60, j ** -0.8, 60 ** -0.8 * (j / 60) ** -2.0)  # p_512 / p_1 ~ 5e-4: far above round-off
    p /= p.sum()
    half = p.astype(np.float16) if dtype == "numpy float16" else torch.from_numpy(p).to(dtype)
    fit, reference = estimate_crossover(half), estimate_crossover(p)
    assert fit.ranks == reference.ranks == (1, 512)
    assert fit.located and fit.rank == pytest.approx(reference.rank, rel=0.01)
    assert fit.tail_alpha == pytest.approx(reference.tail_alpha, rel=0.01)


class _Holder(torch.nn.Module):  # at module level: pickle finds the class by reference
    def __init__(self):
        super().__init__()
        from tests.support.models import TinyLM

        self.net = TinyLM(vocab=64, d=16, heads=2, layers=2, dropout=0.0)

    def forward(self, ids):
        return self.net(ids)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("owner", ["lens", "probe"])
def test_an_attached_lens_or_probe_still_pickles_and_deep_copies(how, owner):
    # before: Attachment held its model in a weakref.ref (to free a detached model), which pickle refuses
    # ("cannot pickle 'weakref.ReferenceType' object"): torch.save of a model keeping an attached lens or
    # probe as an attribute (docs/api-core.md promises it saves whole) failed; a deep copy's handle still
    # pointed at the original model, so it was inactive and its remove() left the copy bound
    import copy
    import io

    import spectral_lens as sl
    from tests.support.models import lm_pool

    model = _Holder()
    if owner == "lens":
        model.lens = sl.SpectralLens(pool=lm_pool(1, t=8), layers="net.h.1", params=(), progress=False)
    else:
        model.lens = sl.PerSampleGradientProbe(params="net.h.1.attn.c_proj.weight")
    model.lens.attach(model)
    if how == "pickle":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    else:
        copied = copy.deepcopy(model)
    handle = copied.lens._attachment
    assert copied.lens.model is copied and handle.model is copied and handle.active  # one object graph
    handle.remove()
    assert copied.lens.model is None and model.lens.model is model  # the copy's handle unbinds the copy only


def test_a_nested_mask_is_refused_naming_the_accumulator_and_the_shape_expected():
    # before: the mask's shape check read mask.shape of a nested tensor: "RuntimeError: Internal error:
    # NestedTensorImpl doesn't support sizes. Please file an issue." (the input itself was checked)
    acc = ActivationCovarianceAccumulator(name="blocks.0")
    mask = torch.nested.nested_tensor([torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool)],
                                      layout=torch.jagged)
    with pytest.raises(TypeError, match=r"blocks\.0: mask is a nested tensor .*leading shape \(2, 3\)"):
        acc.update(torch.randn(2, 3, 4), mask)
    assert not acc.initialized
