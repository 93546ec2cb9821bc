"""Gap found by mutation testing of ``cast_cache``: autocast leaves float64 weights alone, so the cache
must too; a float64 model measured under ``autocast_dtype=bfloat16`` gets float64 rows, the same with
and without the cache, equal to the float64 reference."""

from __future__ import annotations

import numpy as np
import torch

from spectral_lens.gradients import PerSampleGradientProbe, cast_cache
from support.models import TinyGPT, lm_batch

NAME = "transformer.h.1.attn.c_proj.weight"


def test_float64_model_under_bf16_autocast_is_not_cast(monkeypatch, helpers):
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    batch = lm_batch(m=4)

    def rows(on: bool) -> torch.Tensor:
        monkeypatch.setattr(cast_cache, "ENABLED", on)
        probe = PerSampleGradientProbe(model, NAME, autocast_dtype=torch.bfloat16, chunk_size=2, keep_matrix=True)
        return probe.update(batch).matrix()

    cached, plain = rows(True), rows(False)
    assert torch.equal(cached, plain)
    ref = helpers.reference_rows(model, [NAME], batch, helpers.lm_sample_loss)[NAME]
    assert np.abs(cached.numpy() - ref).max() <= 1e-12 * np.abs(ref).max()
