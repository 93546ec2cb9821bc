"""Adversarial test data with known float64 references."""

from __future__ import annotations

import numpy as np
import torch


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def rows_with_spectrum(n: int, eigenvalues: np.ndarray, mean_scale: float, rng: np.random.Generator) -> np.ndarray:
    """n x d rows with population covariance Q diag(eigenvalues) Q^T and per-feature means up to mean_scale."""
    d = eigenvalues.size
    q = random_orthogonal(d, rng)
    z = rng.standard_normal((n, d))
    means = mean_scale * rng.uniform(-1, 1, d)
    return z * np.sqrt(eigenvalues) @ q.T + means


def exact_covariance_rows(eigenvalues: np.ndarray, n: int, rng: np.random.Generator, mean_scale: float = 0.0) -> np.ndarray:
    """Rows whose SAMPLE covariance is exactly Q diag(eigenvalues) Q^T (up to float64 round-off)."""
    d = eigenvalues.size
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    u, _, _ = np.linalg.svd(z, full_matrices=False)  # orthonormal, centered columns
    u *= np.sqrt(n - 1)
    return u * np.sqrt(eigenvalues) @ random_orthogonal(d, rng).T + mean_scale * rng.uniform(-1, 1, d)


def reference_eigenvalues(rows: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(np.cov(rows.astype(np.float64), rowvar=False))[::-1]


def cov_eigs(rows: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the sample covariance of ``rows`` (features last), float64, descending, clipped at 0."""
    return np.clip(reference_eigenvalues(rows.detach().double().reshape(-1, rows.shape[-1]).numpy()), 0, None)


def theorem6_spectrum(d: int, p: float, q: float, eta_t: float, c: float = 1.0) -> np.ndarray:
    """lambda_r = C r^-p (1 - exp(-eta t r^-q))^2 (paper Thm. 6): head ~ r^-p, tail ~ r^-(p + 2q)."""
    r = np.arange(1, d + 1, dtype=np.float64)
    return c * r**-p * (-np.expm1(-eta_t * r**-q)) ** 2


def as_tensor(rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rows).to(dtype)


class RandomTokens(torch.utils.data.Dataset):
    """Tokenizer-free causal-LM examples for a Hugging Face ``Trainer``: ``n`` rows of ``length`` random token ids
    below ``vocab`` (seeded), labels = input_ids (the model shifts them)."""

    def __init__(self, n: int, seed: int, *, vocab: int, length: int) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
