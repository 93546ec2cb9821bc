"""Review 22 (rng): the vmap engine's float16 retries replay every global stream, not only torch's.

A float16 backward far from its loss scale is retried at other scales (``engines.scaled_backward``); each try
must draw what the first one drew. The retries replayed torch's CPU and CUDA generators only: a forward drawing
from numpy's global generator or Python's ``random`` (augmentation, LayerDrop) drew new values at every try, so
the rows were those of the last try's draws (not the ones a start at the final scale draws: a bounded-memory
recomputation, whose carried scale needs one try, recomputed other rows than the first computation kept), and
those streams ended as many tries on.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from support.models import TinyLM

from spectral_lens.gradients import engines

from .test_fp16_loss_scaling import NAMES, mean_ce


class _Drawing(torch.nn.Module):
    """TinyLM (float16, small weights) whose logits are scaled by draws from numpy's and Python's generators."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm = TinyLM(vocab=64, d=16, layers=1, ctx=8, tied=False, dropout=0.0).eval()
        with torch.no_grad():
            for p in self.lm.parameters():
                p.mul_(0.03)
        self.lm.half()

    def forward(self, idx):
        return self.lm(idx) * (1.0 + float(np.random.random()) + random.random())


def test_vmap_retries_replay_numpy_and_python_draws():
    model = _Drawing()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    batch = ids[:, :-1], ids[:, 1:]
    names = ["lm." + k for k in NAMES]
    params = {k: dict(model.named_parameters())[k] for k in names}
    out = []
    for start in (2.0 ** -30, None):
        scale = engines.LossScale()
        scale.value = out[0][2] if start is None else start  # then the scale the first run settled on: one try
        np.random.seed(5), random.seed(5)
        rows, _ = engines.vmap_engine(model, params, batch, 3, lambda m, b: m(b[0]), mean_ce(1.0), loss_scale=scale)
        out.append((rows, (np.random.random(), random.random()), scale.value))
    (a, next_a, s_a), (b, next_b, s_b) = out
    assert s_a == s_b != 2.0 ** -30
    assert next_a == next_b  # the streams end where one try leaves them
    assert all(torch.equal(a[k], b[k]) for k in names)
