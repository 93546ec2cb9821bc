"""The toy's measurements leave training untouched and record spectra plus Fourier scalars."""
import torch

from examples.toy.measure import ToyLens
from examples.toy.model import ToyConfig
from examples.toy.task import CyclicTask
from examples.toy.train import ToyRun
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def test_measure_has_no_side_effects_and_records(tmp_path):
    cfg = ToyConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, seq_len=16)
    s = CyclicTask(c=17, context=16, vocab=64, max_step=4, n_examples=600, heldout=200).split()
    run = ToyRun("Untied", 8, {"embed": 3e-3, "head": 3e-3, "hidden": 0.02}, cfg)
    run.train_until(40, 80, s.x_train, s.y_train)  # a partly trained model with gradients left on it
    model = run.model
    model.train()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(s.x_heldout[:5])
    rng = torch.get_rng_state()
    gen = run.gen.get_state()
    with RunWriter(tmp_path / "r", RunInfo("r", family="Untied", batch_tier=8, total_tokens=80, n_layer=2),
                   tail_window=(3, 10), head_window=(1, 3), fsync=False) as w:
        lens = ToyLens(model, s.x_heldout, s.y_heldout, s.phase_heldout, 17, w, gradient_samples=16)
        val = lens.measure(5, 40, 0.5)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(run.gen.get_state(), gen)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert torch.equal(model(s.x_heldout[:5]), out)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    rec = RunRecord.open(tmp_path / "r")
    m = rec.measurements[0]
    assert m.val_loss == val and m.tokens == 40
    assert {"act:blocks.1", "grad:blocks.1.attn.c_proj.weight"} <= set(m.spectra)
    assert m.spectra["act:blocks.1"].n_rows == 200  # one row per example: the last position only
    assert {"H_S", "H_peak", "pc1_peak", "noise_scale"} <= set(m.scalars)
    assert len(m.spectra["grad:blocks.1.attn.c_proj.weight"]) <= 16
