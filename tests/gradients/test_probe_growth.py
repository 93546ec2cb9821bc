"""PerSampleGradientProbe: no per-update cost that grows with the samples already held (issue #13).

Every ``update`` grew the (M, M) float64 Gram matrices into fresh zero matrices and copied the old ones
(``grow_square``: O(M^2) per update, though resident chunks' entries are only filled by ``_complete``),
and joined ALL losses so far to check the new ones (``torch.cat(self._losses)[start:]``: O(M) per
update); the rollback snapshot copied the row, chunk and loss lists. A pool of one-sequence batches
paid O(M^3) over a pass. Now an update dispatches the same operations on the same shapes whatever M
is (the Gram matrices are sized and filled by ``_complete``; a non-resident chunk's blocks wait on the
chunk until then), with Gram matrices, spectra and losses bit-identical to before (compared on resident,
bounded-memory, offloaded, several-parameter, vmap/loop and rejected-update cases while the change was
made) and float64-exact here against a per-sample loop.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients.losses import causal_lm_loss
from support.models import TinyGPT
from support.per_sample import per_sample_grams as _reference

NAMES = ["transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"]
CONFIGS = {
    "resident": dict(chunk_size=3),
    "bounded": dict(chunk_size=2, max_resident_samples=3),
    "offload": dict(chunk_size=2, offload_rows=True),
    "loop_bounded": dict(chunk_size=2, max_resident_samples=4, engine="loop"),
}


def _model(dtype=torch.float64) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(d=16, layers=2, ctx=8).to(dtype).eval()


def _batch(g: torch.Generator, n: int):
    return torch.randint(0, 37, (n, 8), generator=g), torch.randint(0, 37, (n, 8), generator=g)


class _Ops(TorchDispatchMode):
    """Every operation dispatched, with the shapes of its tensor inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_flatten((args, kwargs, out))[0]
        self.ops.append((str(func), tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))))
        return out


def _ops_of_update(probe, batch) -> list[tuple]:
    with _Ops() as rec:
        probe.update(batch)
    return rec.ops


@pytest.mark.parametrize("config", ["resident", "bounded"])
def test_an_update_dispatches_the_same_operations_whatever_the_samples_held(config):
    """The 4th and the 17th update of a two-sequence batch run the same operations on the same shapes:
    no (M, M) allocation or copy, no join over all M losses (the old code's zeros/copy_ of (8, 8) and
    (34, 34) and its cat of all losses made the lists differ)."""
    model = _model(torch.float32)
    probe = PerSampleGradientProbe(model, NAMES[:1], **CONFIGS[config])
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        probe.update(_batch(g, 2))
    early = _ops_of_update(probe, _batch(g, 2))
    for _ in range(12):
        probe.update(_batch(g, 2))
    late = _ops_of_update(probe, _batch(g, 2))
    assert probe.n_samples_ == 34
    largest = lambda ops: max((s for _, shapes in ops for sh in shapes for s in [torch.Size(sh).numel()]), default=0)  # noqa: E731
    assert late == early, (f"update at M=32 ran {len(late)} operations (largest tensor {largest(late)} elements) "
                           f"vs {len(early)} ({largest(early)}) at M=6")


def test_an_update_copies_none_of_the_per_sample_lists():
    """The rollback snapshot keeps the row, chunk and loss lists' lengths, not copies (list() of the
    chunk list per update was O(M)): an update iterates none of them."""

    class Counting(list):
        iterations = 0

        def __iter__(self):
            Counting.iterations += 1
            return super().__iter__()

    probe = PerSampleGradientProbe(_model(torch.float32), NAMES, chunk_size=2)
    g = torch.Generator().manual_seed(1)
    probe.update(_batch(g, 3))
    probe._chunks, probe._losses = Counting(probe._chunks), Counting(probe._losses)
    probe._rows = {n: Counting(r) for n, r in probe._rows.items()}
    probe.update(_batch(g, 3))
    assert Counting.iterations == 0
    assert probe.n_samples_ == 6 and len(probe._chunks) == 4 and len(probe.losses_) == 6




@pytest.mark.parametrize("config", list(CONFIGS))
def test_grams_across_computes_and_rejected_updates_match_a_float64_reference(config):
    """Gram matrices read between updates (compute, gram, noise_scale), more updates after them, and
    updates rejected mid-way (a loss_fn that raises in the second chunk, NaN losses caught after every
    chunk was added): the Gram matrices and losses are those of the accepted samples, float64-exact
    against a per-sample loop, and bit-identical to a twin probe that never saw the rejected batches."""
    model = _model()
    armed = {"calls": None, "nan": False}

    def loss_fn(out, batch):
        loss = causal_lm_loss(out, batch)
        if armed["calls"] is not None:
            armed["calls"] -= 1
            if armed["calls"] < 0:
                if armed["nan"]:
                    return loss * float("nan")
                raise RuntimeError("rejected on purpose")
        return loss

    kw = dict(CONFIGS[config])
    probe = PerSampleGradientProbe(model, NAMES, loss_fn=loss_fn, **kw)
    twin = PerSampleGradientProbe(model, NAMES, loss_fn=causal_lm_loss, **kw)
    g = torch.Generator().manual_seed(2)
    accepted = []
    plan = [(1, None), (3, None), "read", (5, (1, False)), (2, None), (4, (0, True)), "read", (1, None),
            (4, (1, True)), (3, None)]
    for step in plan:
        if step == "read":
            for p in (probe, twin):
                p.compute(), p.noise_scale()
            continue
        n, arm = step
        batch = _batch(g, n)
        if arm is None:
            probe.update(batch), twin.update(batch)
            accepted.append(batch)
            continue
        armed["calls"], armed["nan"] = arm
        with pytest.raises(Exception, match="rejected on purpose|non-finite"):
            probe.update(batch)
        armed["calls"] = None
    ref, ref_losses = _reference(model, accepted, NAMES)
    assert probe.n_samples_ == twin.n_samples_ == 10
    torch.testing.assert_close(probe.losses_, ref_losses, rtol=1e-12, atol=0)
    assert torch.equal(probe.losses_, twin.losses_)
    for n in NAMES:
        k = probe.gram(n)
        torch.testing.assert_close(k, ref[n], rtol=1e-10, atol=1e-12 * float(ref[n].diagonal().max()))
        assert torch.equal(k, twin.gram(n)), n
        assert torch.equal(probe.compute()[n].values, twin.compute()[n].values), n


@pytest.mark.parametrize("train_mode", [False, True])
def test_every_module_keeps_its_own_mode(train_mode):
    """The modes switched for the pass (train() now only when a flag differs) are set back module by
    module, a model left with mixed flags included."""
    model = _model(torch.float32)
    model.transformer.h[0].train()
    model.lm_head.train()
    before = [(name, m.training) for name, m in model.named_modules()]
    probe = PerSampleGradientProbe(model, NAMES[:1], train_mode=train_mode)
    probe.update(_batch(torch.Generator().manual_seed(3), 2))
    assert [(name, m.training) for name, m in model.named_modules()] == before
    model.eval()
    probe.update(_batch(torch.Generator().manual_seed(4), 2))
    assert not any(m.training for m in model.modules())
