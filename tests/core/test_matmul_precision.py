"""The accumulator pins IEEE float32 products without touching the user's matmul settings.

Found by an audit (2026-11-27): the accumulator read and re-set torch's legacy global
``set_float32_matmul_precision`` around every update. With PyTorch's per-backend settings
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``, the API PyTorch now recommends) reading it
raised inside the user's forward; after nanoGPT's ``allow_tf32 = True`` writing it back changed
``torch.backends.mkldnn.matmul.fp32_precision`` from "none" to "tf32". Each case runs in a fresh
process (a fork of one fresh interpreter that imported torch and changed nothing): the settings
are process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

_CASES = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from torch import nn
import spectral_lens as sl
from spectral_lens.spectra import moments
b = torch.backends
def flags():
    return {k: getattr(o, "fp32_precision", None) for k, o in
            dict(glob=b, cuda_matmul=b.cuda.matmul, mkldnn=b.mkldnn, mkldnn_matmul=b.mkldnn.matmul,
                 cudnn=b.cudnn, cudnn_conv=b.cudnn.conv).items()}
def case(setup):
    exec(setup)
    before = flags()
    inside = []
    real = moments.symmetric_product
    def spy(*a, **k):
        inside.append(b.mkldnn.matmul.fp32_precision)
        return real(*a, **k)
    moments.symmetric_product = spy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 30
    model = nn.Sequential(nn.Identity(), nn.Identity())
    for max_chunk_rows in (131072, 100):  # the CPU one-chunk path; the generic path
        acc = sl.ActivationCovarianceAccumulator(max_chunk_rows=max_chunk_rows)
        with acc.attach(model, "1"), torch.no_grad():
            model(x.float())
        err = float(np.abs(np.sort(acc.compute().values.numpy())[::-1] - np.linalg.eigvalsh(np.cov(x.float().double().numpy().T))[::-1]).max())
    return dict(before=before, after=flags(), inside=inside, err=err)
results = {}
for setup in json.loads(sys.argv[2]):
    # each case in a fork of this interpreter, which imported torch but changed no setting: a fresh
    # process state per case (the settings are process-wide) without an interpreter start per case
    r, w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out, status = dict(result=case(setup)), 0
        except BaseException:
            out, status = dict(error=traceback.format_exc()), 1
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(status)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    results[setup] = json.loads(text) if text else dict(error=f"case process ended with wait status {status}")
print(json.dumps(results))
"""

CASES = {
    "new API: cuda matmul tf32": "b.cuda.matmul.fp32_precision = 'tf32'",
    "new API: mkldnn matmul bf16": "b.mkldnn.matmul.fp32_precision = 'bf16'",
    "new API: global tf32": "b.fp32_precision = 'tf32'",
    "nanoGPT: allow_tf32": "b.cuda.matmul.allow_tf32 = True; b.cudnn.allow_tf32 = True",
    "legacy: high": "torch.set_float32_matmul_precision('high')",
    "defaults": "pass",
}


@pytest.fixture(scope="module")
def case_results():
    """Every case's result, from one fresh interpreter that forks a process per case (six interpreter
    starts, each importing torch, cost ~14 s of the CI tier)."""
    proc = subprocess.run([sys.executable, "-c", _CASES, str(ROOT), json.dumps(list(CASES.values()))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "matmul"), reason="torch without per-backend settings")
@pytest.mark.parametrize("setup", list(CASES.values()), ids=list(CASES))
def test_user_matmul_settings_survive_and_products_are_ieee(setup, case_results):
    r = case_results[setup]
    assert "error" not in r, r["error"][-2000:]
    r = r["result"]
    assert r["after"] == r["before"]  # no setting changed by measuring
    # every CPU product (the generic path's symmetric_product) ran with IEEE float32: the leaf set to
    # "ieee", or left at "none" where nothing above it asks for less
    inherited_ieee = all(r["before"][k] in ("none", "ieee", None) for k in ("mkldnn", "glob"))
    assert r["inside"] and all(v == "ieee" or (v == "none" and inherited_ieee) for v in r["inside"]), r
    assert r["err"] < 1e-4
