"""Mutation audit (measure.py / workload.step_at): the recorded numbers against independent computations.

Written because mutants that measured the first position instead of the last, dropped the final norm
or the untied readout from the validation loss, or rounded step_at to nearest passed the toy tests.
"""
import math

import numpy as np
import pytest
import torch

from examples.toy.measure import ToyLens, last_position_mask
from examples.toy.model import ToyConfig
from examples.toy.probes import fourier_summaries
from examples.toy.task import CyclicTask
from examples.toy.train import ToyRun, evaluate
from examples.toy.workload import step_at
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def test_last_position_mask_selects_only_the_last_position():
    x = torch.zeros(3, 5, dtype=torch.long)
    mask = last_position_mask((x, torch.zeros(3, dtype=torch.long)))
    assert mask.tolist() == [[False] * 4 + [True]] * 3


@pytest.mark.parametrize("family, lrs", [("Untied", {"embed": 3e-3, "head": 3e-2, "hidden": 0.02}),
                                         ("RoPE", {"adam": 3e-3})])
def test_recorded_val_loss_and_fourier_scalars_match_the_model(tmp_path, family, lrs):
    cfg = ToyConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, seq_len=16)
    s = CyclicTask(c=17, context=16, vocab=64, max_step=4, n_examples=500, heldout=150).split()
    run = ToyRun(family, 8, lrs, cfg)
    run.train_until(48, 80, s.x_train, s.y_train)  # a trained (nonzero) untied head
    with RunWriter(tmp_path / "r", RunInfo("r", family=family, batch_tier=8, total_tokens=80, n_layer=2),
                   tail_window=(3, 10), head_window=(1, 3), fsync=False) as w:
        lens = ToyLens(run.model, s.x_heldout, s.y_heldout, s.phase_heldout, 17, w, gradient_samples=8)
        val = lens.measure(6, 48, 0.6)
        assert lens.val_loss() == pytest.approx(val, rel=1e-6)
    # the validation loss is the model's own next-token loss on the held-out pool (its forward pass)
    assert val == pytest.approx(evaluate(run.model, s.x_heldout, s.y_heldout), rel=1e-5)
    m = RunRecord.open(tmp_path / "r").measurements[0]
    # the Fourier scalars are those of the LAST position's hidden state
    with torch.no_grad():
        h = run.model.hidden(s.x_heldout)[:, -1]
    want = fourier_summaries(h, s.phase_heldout, 17)
    for k in ("H_S", "H_peak", "pc1_peak"):
        assert m.scalars[k] == pytest.approx(want[k], rel=1e-6), k
    # the activation spectrum is that of the last position: same nonzero eigenvalues up to one scale
    spec = np.sort(np.asarray(m.spectra["act:blocks.1"].values.double().numpy(), dtype=np.float64))[::-1]
    hc = h.double().numpy() - h.double().numpy().mean(axis=0)
    ref = np.sort(np.linalg.eigvalsh(hc.T @ hc))[::-1]
    k = min(len(spec), len(ref), 8)
    np.testing.assert_allclose(spec[:k] / spec[0], ref[:k] / ref[0], rtol=1e-4, atol=1e-6)


def test_step_at_is_the_first_step_at_or_past_the_fraction():
    # ceil, not nearest: 20% of 7 steps is 1.4 -> step 2; 25% of 10 is 2.5 -> 3; exact products stay
    assert [step_at(f, 7) for f in (0.0, 0.2, 0.5, 1.0)] == [0, 2, 4, 7]
    assert step_at(0.25, 10) == 3 and step_at(0.2, 32) == 7 and step_at(0.2, 125) == 25
    # the validation grid multiplies k * eval_every: 3 * 0.05 * 40 is 6.000000000000001 in float64
    assert [step_at(k * 0.05, 40) for k in (3, 6, 7, 12, 14)] == [6, 12, 14, 24, 28]
    for steps in range(1, 200):
        for f in (0.05, 0.1, 0.15, 0.2, 0.3):
            s = step_at(f, steps)
            assert s >= f * steps - 1e-9 and (s - 1) < f * steps - 1e-9, (f, steps, s)
            assert s == math.ceil(f * steps - 1e-9)
