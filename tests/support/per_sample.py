"""A float64 per-sample gradient reference for the probe's tests: one forward and one ``autograd.grad`` per
sample."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from hypothesis import strategies as st

from spectral_lens.gradients.losses import causal_lm_loss


def per_sample_grams(model, batches, names) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """float64 Gram matrices (per parameter name) and losses of ``(inputs, targets)`` ``batches``, sample by
    sample."""
    ps = [model.get_parameter(n) for n in names]
    rows, losses = {n: [] for n in names}, []
    for x, y in batches:
        for i in range(x.shape[0]):
            sample = (x[i : i + 1], y[i : i + 1])
            loss = causal_lm_loss(model(sample[0]), sample)
            for n, grad in zip(names, torch.autograd.grad(loss.sum(), ps)):
                rows[n].append(grad.reshape(-1).double())
            losses.append(loss.detach().double())
    return {n: torch.stack(r) @ torch.stack(r).T for n, r in rows.items()}, torch.cat(losses)


# A float64 MLP probed at its last weight, shared by the gloo tests of wrapped layers (fully_shard, replicate)
MLP_KW = {"params": "2.weight", "forward_fn": lambda m, b: m(b[0]),
          "loss_fn": lambda out, b: ((out - b[1]) ** 2).sum(-1)}


def mlp_model():
    """``Linear(4, 6) - Tanh - Linear(6, 3)`` in float64, seeded (every rank builds the same one)."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def mlp_batches():
    """Two seeded ``(inputs, targets)`` batches of 5 rows for :func:`mlp_model`."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
            for _ in range(2)]


def mlp_probe_values(model, engine):
    """The engines the probe used on :func:`mlp_batches` and its spectrum's values, as lists (a rank's JSON result)."""
    from spectral_lens import PerSampleGradientProbe

    probe = PerSampleGradientProbe(model, engine=engine, **MLP_KW)
    for b in mlp_batches():
        probe.update(b)
    return {"engines": probe.engines_, "values": probe.compute().values.tolist()}


@contextlib.contextmanager
def no_mixed_weights_warning():
    """Asserts that the block emits no ``MixedWeightsWarning`` (every warning recorded, whatever the filters)."""
    from spectral_lens import MixedWeightsWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    mixed = [str(w.message) for w in seen if issubclass(w.category, MixedWeightsWarning)]
    assert not mixed, mixed


def head_problem(n, d, v, offset, ignore_frac, seed, dtype):
    """A head + cross-entropy problem: hidden states ``(n, d)``, a head ``(v, d)`` with a bias carrying a large common
    logit ``offset``, targets with an ``ignore_frac`` share of -100, drawn in float64 and cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) + offset  # a large common logit offset
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return h.to(dtype), w.to(dtype), b.to(dtype), t


#: hypothesis strategies of one head + loss problem (sizes, chunking, logit offset, padding, dtype)
PROBLEMS = dict(
    n=st.integers(1, 40),
    d=st.integers(1, 24),
    v=st.integers(2, 300),
    chunk=st.integers(1, 50),
    offset=st.sampled_from([0.0, 30.0, 1e4]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
