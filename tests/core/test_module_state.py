"""Attached measurement against the user's module and process state: hooks called from several
threads, copies and pickles of a hooked model."""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from spectral_lens import attach

from support.data import rows_with_spectrum


def test_hook_called_from_threads_loses_no_rows():
    # nn.DataParallel runs its replicas (which share the hooks) in threads; so may a user's own
    # thread pool. Each forward's update must land whole: exact count, float64-exact covariance.
    rng = np.random.default_rng(3)
    d, per, n_threads, per_thread = 48, 16, 4, 60
    rows = rows_with_spectrum(n_threads * per_thread * per, np.arange(1, d + 1) ** -1.0, 50.0, rng)
    chunks = list(torch.from_numpy(rows).split(per))
    model = nn.Sequential(nn.Identity())
    start = threading.Barrier(n_threads)

    def work(part):
        start.wait()
        with torch.no_grad():
            for x in part:
                model(x)

    with attach(model, "0") as capture:
        threads = [threading.Thread(target=work, args=(chunks[i::n_threads],)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    acc = capture.accumulators["0"]
    assert acc.n_rows == rows.shape[0]
    ref = np.cov(rows, rowvar=False)
    np.testing.assert_allclose(acc.covariance().numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
