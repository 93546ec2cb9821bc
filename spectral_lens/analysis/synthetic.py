"""Synthetic batch sweeps from the paper's smooth-spectrum model (Thm. 6 / Thm. 7, protocol sec. 10).

Each tier ``B`` learns modes ``r = 1..dim`` at rates ``kappa_r(B) = eta_B r^-q_B`` toward teacher
energies ``beta_r^2 = C r^-p``. At time ``t`` (here: the progress fraction, tokens / budget):

* activation eigenvalues ``lambda_r = C r^-p (1 - exp(-kappa_r t))^2`` (Eq. 4): a learned head, a
  crossover at ``r* = (eta_B t)^(1/q_B)`` and an unresolved tail with exponent ``p + 2 q_B``;
* gradient eigenvalues ``kappa_r^2 C r^-p exp(-2 kappa_r t)`` (residual energy per mode);
* validation loss ``loss_floor + loss_scale * sum_r w_r exp(-2 kappa_r t)`` with
  ``w_r = r^-p / sum r^-p`` (normalized residual energy).

If ``eta_B >= eta_B'`` and ``q_B <= q_B'``, every mode of ``B`` is at least as fast, so ``B`` reaches
any loss first *and* has the flatter early tail: the family's ordering is known by construction.
This is test and demonstration data, not a claim about real training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..records import RunInfo, RunWriter
from ..spectrum import Spectrum

__all__ = ["theorem6_activation", "theorem6_gradient", "theorem6_loss", "default_q", "write_theorem6_sweep"]


def _rates(dim: int, eta: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(1, dim + 1, dtype=np.float64)
    return r, eta * r**-q


def theorem6_activation(t: float, *, dim: int = 768, p: float = 1.0, eta: float = 25.0, q: float = 0.6, C: float = 1.0) -> np.ndarray:
    """Activation eigenvalues ``C r^-p (1 - exp(-eta r^-q t))^2``, sorted descending."""
    r, kappa = _rates(dim, eta, q)
    lam = C * r**-p * (-np.expm1(-kappa * t)) ** 2
    return np.sort(lam)[::-1].copy()


def theorem6_gradient(t: float, *, dim: int = 512, p: float = 1.0, eta: float = 25.0, q: float = 0.6, C: float = 1.0) -> np.ndarray:
    """Gradient eigenvalues ``kappa_r^2 C r^-p exp(-2 kappa_r t)`` of the first ``dim`` modes, descending."""
    r, kappa = _rates(dim, eta, q)
    return np.sort(kappa**2 * C * r**-p * np.exp(-2 * kappa * t))[::-1].copy()


def theorem6_loss(t: float, *, dim: int = 768, p: float = 1.0, eta: float = 25.0, q: float = 0.6,
                  loss_floor: float = 2.8, loss_scale: float = 1.5) -> float:
    """Validation loss ``loss_floor + loss_scale * sum_r w_r exp(-2 kappa_r t)``, ``w_r ∝ r^-p``."""
    r, kappa = _rates(dim, eta, q)
    w = r**-p / np.sum(r**-p)
    return float(loss_floor + loss_scale * np.sum(w * np.exp(-2 * kappa * t)))


def default_q(tier: float) -> float:
    """Tier -> ``q_B``: ``0.55 + 0.05 (log2 B - 2.3)^2`` (U-shaped, best tier 4, all tiers distinct)."""
    return 0.55 + 0.05 * (math.log2(tier) - 2.3) ** 2


def write_theorem6_sweep(
    root: str | Path,
    tiers: Sequence[float] = (1, 2, 4, 8, 16, 32),
    *,
    family: str = "toy",
    q: Callable[[float], float] | Mapping[float, float] = default_q,
    eta: Callable[[float], float] | Mapping[float, float] | float = 25.0,
    p: float = 1.0,
    dim: int = 768,
    grad_dim: int = 512,
    n_eval: int = 200,
    n_measure: int = 40,
    noise: float = 0.0,
    seed: int = 0,
    total_tokens: int = 1_000_000_000,
    tokens_per_tier: int = 65_536,
    seq_len: int = 1024,
    throughput: Callable[[float], float] | None = None,
    loss_floor: float = 2.8,
    loss_scale: float = 1.5,
    fsync: bool = False,
    tail_window: tuple[int, int] | None = None,
    head_window: tuple[int, int] | None = (10, 40),
) -> list[Path]:
    """Write one run directory per tier under ``root/<family>-b<tier>``; returns their paths.

    Args:
        tiers: batch tiers; tier ``B`` uses ``B * tokens_per_tier`` tokens per step.
        q, eta: per-tier ``q_B`` and ``eta_B`` (callables of the tier, mappings, or a constant eta).
        p: teacher exponent; ``dim``/``grad_dim``: activation / gradient spectrum sizes.
        n_eval: validation evaluations (``log.jsonl``) over the budget; ``n_measure``: spectral
            measurements (``measurements.jsonl``), evenly spaced in progress (first at 1/n_measure).
        noise: standard deviation of i.i.d. multiplicative log-normal noise on every eigenvalue
            (and of the log noise scale), per measurement; 0 = exact model.
        seed: seed of that noise.
        throughput: tier -> tokens/s (default ``4e5 * B / (B + 4)``), logged with 2% jitter.
        fsync, tail_window, head_window: passed to :class:`~spectral_lens.records.RunWriter` (the
            windows recorded in ``run.json``; default tail window: the scale rule for ``n_layer=12``).

    The measurement scalar ``noise_scale`` is a toy gradient noise scale in samples per step:
    ``B_simple(t) = 64 * 4 * (L(0.05) - floor) / (L(t) - floor)`` times the noise.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    q_of = q if callable(q) else (lambda b: float(q[b]))
    eta_of = eta if callable(eta) else ((lambda b: float(eta[b])) if isinstance(eta, Mapping) else (lambda b: float(eta)))
    thr_of = throughput or (lambda b: 4e5 * b / (b + 4))
    paths = []
    for tier in tiers:
        qb, eb = q_of(tier), eta_of(tier)
        tps = int(tier * tokens_per_tier)
        n_steps = int(math.ceil(total_tokens / tps))
        name = f"b{int(tier)}" if float(tier).is_integer() else f"b{tier:g}"
        info = RunInfo(
            run_id=f"{family}-{name}",
            family=family,
            batch_tier=tier,
            tokens_per_step=tps,
            seed=seed,
            n_layer=12,
            total_tokens=total_tokens,
            batch_size=tps // seq_len or tps / seq_len,  # samples per step: a fraction below one sequence
            primary_spectrum="act:blocks.11",
            extras={"synthetic": "theorem6", "q_B": qb, "eta_B": eb, "p": p},
        )
        path = root / info.run_id
        kw = dict(p=p, eta=eb, q=qb)
        loss0 = theorem6_loss(0.05, dim=dim, loss_floor=loss_floor, loss_scale=loss_scale, **kw) - loss_floor
        q_tier = thr_of(tier)
        with RunWriter(path, info, fsync=fsync, tail_window=tail_window, head_window=head_window) as w:
            for k in range(1, n_eval + 1):
                t = k / n_eval
                step = int(round(t * n_steps))
                loss = theorem6_loss(t, dim=dim, loss_floor=loss_floor, loss_scale=loss_scale, **kw)
                w.log(step, step * tps, val_loss=loss, train_loss=loss + 0.02,
                      tokens_per_s=q_tier * (1 + 0.02 * rng.standard_normal()), time=float(k))
            for k in range(1, n_measure + 1):
                t = k / n_measure
                step = int(round(t * n_steps))
                act = theorem6_activation(t, dim=dim, **kw)
                grad = theorem6_gradient(t, dim=grad_dim, **kw)
                if noise > 0:
                    act = np.sort(act * np.exp(noise * rng.standard_normal(act.size)))[::-1].copy()
                    grad = np.sort(grad * np.exp(noise * rng.standard_normal(grad.size)))[::-1].copy()
                loss = theorem6_loss(t, dim=dim, loss_floor=loss_floor, loss_scale=loss_scale, **kw)
                b_simple = 256.0 * loss0 / (loss - loss_floor) * math.exp(noise * rng.standard_normal())
                spectra = {
                    "act:blocks.11": Spectrum(act, n_rows=65_536, dim=dim, source="blocks.11"),
                    "grad:blocks.11.attn.c_proj": Spectrum(grad, n_rows=grad_dim, dim=grad_dim, kind="gradient",
                                                           source="blocks.11.attn.c_proj.weight"),
                }
                w.log_measurement(step, step * tps, spectra, val_loss=loss, progress=t,
                                  scalars={"noise_scale": b_simple})
        paths.append(path)
    return paths
