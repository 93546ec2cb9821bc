"""The toy's speed-ups change no number: chunked evaluation passes, the in-place MLP activation, the allocator.

Each is compared bit for bit with the computation it replaced (written out here), on the ``cpu``
preset's model shape with a held-out pool that splits into unequal chunks.
"""
import os

import torch
import torch.nn.functional as F

import examples.toy.__main__ as toy_main
from examples.toy.measure import ToyLens
from examples.toy.model import ToyConfig, norm
from examples.toy.probes import fourier_summaries
from examples.toy.task import CyclicTask
from examples.toy.train import FORWARD_ROWS, ToyRun, evaluate, forward_in_chunks

CFG = ToyConfig(vocab_size=128, n_layer=2, n_head=4, n_embd=64, seq_len=32)
TASK = CyclicTask(c=37, context=32, vocab=128, max_step=8, n_examples=1_500, heldout=700)  # 700 = 256 + 256 + 188


def _trained(family="Muon", lrs=None):
    s = TASK.split()
    run = ToyRun(family, 16, lrs or {"embed": 3e-3, "hidden": 0.02}, CFG)
    run.train_until(160, 320, s.x_train, s.y_train)
    return run, s


def test_chunked_evaluate_equals_one_pass_per_chunk():
    run, s = _trained()
    assert len(s.x_heldout) > 2 * FORWARD_ROWS  # more than one forward per 512-example loss chunk
    model = run.model.eval()
    with torch.no_grad():  # the old evaluate: one forward per 512 examples
        total = 0.0
        for i in range(0, len(s.x_heldout), 512):
            total += float(F.cross_entropy(model(s.x_heldout[i : i + 512]), s.y_heldout[i : i + 512], reduction="sum"))
    assert evaluate(model, s.x_heldout, s.y_heldout) == total / len(s.x_heldout)


def test_chunked_probe_pass_equals_one_pass(tmp_path):
    from spectral_lens.records import RunInfo, RunWriter

    run, s = _trained("Untied", {"embed": 3e-3, "head": 3e-3, "hidden": 0.02})
    model = run.model
    with RunWriter(tmp_path / "r", RunInfo("r", family="Untied", batch_tier=16, total_tokens=320, n_layer=2),
                   tail_window=(3, 10), head_window=(1, 3), fsync=False) as w:
        lens = ToyLens(model, s.x_heldout, s.y_heldout, s.phase_heldout, TASK.c, w, gradient_samples=8)
        val, fourier = lens._probe_pass()
    model.eval()
    with torch.no_grad():  # the old probe pass: the whole pool in one forward
        h = model.hidden(s.x_heldout)[:, -1]
        want = float(F.cross_entropy(norm(h) @ model.lm_head.weight.T, s.y_heldout))
        assert val == want
        assert fourier == fourier_summaries(h, s.phase_heldout, TASK.c)


def test_forward_in_chunks_covers_every_row_once():
    x = torch.arange(10.0)[:, None]
    seen = []
    out = forward_in_chunks(lambda t: seen.append(len(t)) or t * 2, x, rows=4)
    assert seen == [4, 4, 2] and torch.equal(out, x * 2)


def test_in_place_activation_trains_as_before():
    """The MLP's ``relu_`` (in place on the c_fc output) gives the same losses and weights as ``F.relu``."""
    from examples.toy import model as toy_model

    def old_forward(self, x, rotary):
        x = x + self.attn(norm(x), rotary)
        return x + self.c_out(F.relu(self.c_fc(norm(x))).square())

    new, s = _trained()
    new_forward = toy_model.Block.forward
    toy_model.Block.forward = old_forward
    try:
        old, _ = _trained()
    finally:
        toy_model.Block.forward = new_forward
    assert all(torch.equal(a, b) for a, b in zip(new.model.parameters(), old.model.parameters()))


def test_main_restores_the_allocator_environment(tmp_path, monkeypatch):
    """``keep_freed_memory`` sets glibc's variables for the spawned workers only while the command runs."""
    for name in toy_main.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    seen = {}
    monkeypatch.setattr("examples.replicate.pipeline.replicate",
                        lambda *a, **k: seen.update({n: os.environ.get(n) for n in toy_main.MALLOC_ENV}))
    assert toy_main.main(["--preset", "smoke", "--out", str(tmp_path / "o")]) == 0
    assert seen == {n: str(1 << 30) for n in toy_main.MALLOC_ENV}
    assert not any(n in os.environ for n in toy_main.MALLOC_ENV)
