"""Muon: the quintic Newton-Schulz iteration and the optimizer step, against float64 references."""
import math

import pytest
import torch

from examples.nanogpt.muon import NS_COEFFICIENTS, Muon, newton_schulz5, shape_scale


def ns_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The records' iteration written plainly in float64 (the pre-11-10 form a*X + b*A@X + c*A@A@X)."""
    a, b, c = NS_COEFFICIENTS
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if tall else X


def _well_conditioned_square(n: int, seed: int) -> torch.Tensor:
    # a square Gaussian matrix has sigma_min ~ 0; give it a spread spectrum (ratio 20) instead
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q1 @ torch.diag(torch.logspace(0, -1.3, n)) @ q2


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96), (3, 48, 80)])
def test_newton_schulz_band(shape):
    if shape == (96, 96):
        G = _well_conditioned_square(96, 0)
    else:
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(G.double())
    fro = torch.linalg.matrix_norm(G.double(), keepdim=True).squeeze(-1)
    assert (sv / fro).min() > 0.01  # the band below holds for sigma >= 1% of ||G||_F
    s = torch.linalg.svdvals(newton_schulz5(G, dtype=torch.float32).double())
    # 5 steps of sigma -> a*sigma + b*sigma^3 + c*sigma^5 map [0.01, 1] into [0.6818, 1.1344]
    assert s.min() > 0.68 and s.max() < 1.135, (s.min(), s.max())


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (50, 50)])
def test_newton_schulz_matches_float64_reference(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ref = ns_reference(G)
    assert torch.allclose(newton_schulz5(G.double()), ref, atol=1e-12)
    assert (newton_schulz5(G, dtype=torch.float32).double() - ref).abs().max() < 1e-5
    assert (newton_schulz5(G, dtype=torch.bfloat16).double() - ref).abs().max() < 0.05  # the records' precision


def test_batched_is_per_matrix():
    G = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(2))
    out = newton_schulz5(G, dtype=torch.float64)
    for i in range(3):
        assert torch.allclose(out[i], ns_reference(G[i]), atol=1e-12)


def test_shape_scales():
    assert shape_scale(torch.Size([3072, 768]), "sqrt_ratio") == 2.0
    assert shape_scale(torch.Size([768, 3072]), "sqrt_ratio") == 1.0
    assert shape_scale(torch.Size([768, 3072]), "sqrt_max") == math.sqrt(3072)
    assert shape_scale(torch.Size([768, 3072]), "none") == 1.0
    with pytest.raises(ValueError, match="shape scale"):
        shape_scale(torch.Size([2, 2]), "bogus")


@pytest.mark.parametrize("form", ["classical", "ema"])
def test_muon_steps_match_reference(form):
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(48, 32, generator=g, dtype=torch.float64)
    grads = [torch.randn(48, 32, generator=g, dtype=torch.float64) for _ in range(3)]
    W = torch.nn.Parameter(W0.clone())
    opt = Muon([W], lr=0.1, shape_scale="sqrt_ratio", momentum_form=form, ns_dtype=torch.float64)
    Wr, B = W0.clone(), torch.zeros_like(W0)
    for t, G in enumerate(grads):
        mu = 0.85 + 0.05 * t
        opt.param_groups[0]["momentum"] = mu   # momentum warm-up is set by the caller
        W.grad = G.clone()
        opt.step()
        if form == "classical":
            B = mu * B + G
            U = G + mu * B
        else:
            B = mu * B + (1 - mu) * G
            U = (1 - mu) * G + mu * B
        Wr = Wr - 0.1 * math.sqrt(48 / 32) * ns_reference(U)
    assert torch.allclose(W.detach(), Wr, atol=1e-10)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon not in this torch")
def test_agrees_with_torch_optim_muon_where_it_matches():
    """EMA momentum + sqrt(max(1, r/c)) + no decay: both are within bf16 noise of a float64 run."""
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(64, 32, generator=g)
    grads = [torch.randn(64, 32, generator=g) for _ in range(3)]

    def delta(make):
        W = torch.nn.Parameter(W0.clone())
        opt = make(W)
        for G in grads:
            W.grad = G.clone()
            opt.step()
        return W.detach() - W0

    ref = delta(lambda W: Muon([W], lr=0.02, momentum_form="ema", ns_dtype=torch.float64))
    ours = delta(lambda W: Muon([W], lr=0.02, momentum_form="ema", ns_dtype=torch.bfloat16))
    theirs = delta(lambda W: torch.optim.Muon([W], lr=0.02, weight_decay=0.0, adjust_lr_fn="original"))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(ours, ref) < 0.05 and rel(theirs, ref) < 0.05 and rel(ours, theirs) < 0.06


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(5))], lr=0.1)


@pytest.mark.parametrize("lr,momentum", [(float("nan"), 0.95), (float("inf"), 0.95), (0.1, float("nan"))])
def test_muon_rejects_non_finite_settings(lr, momentum):
    """NaN passed the old `lr < 0` check and trained every matrix to NaN."""
    with pytest.raises(ValueError, match="need lr >= 0"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=lr, momentum=momentum)
