"""The toy's measurements at a checkpoint, through the library (paper App. F).

* activation spectrum (``SpectralLens``): the last block's output at the **last position** (the
  pooled representation the readout sees), one row per held-out example;
* per-sample gradient spectrum (``PerSampleGradientProbe``): the last block's attention output
  projection, one sample = one example with its next-token cross-entropy;
* Fourier probes (:mod:`examples.toy.probes`) of the same hidden states along the target's phase.

The validation loss is computed over the same fixed held-out pool, reusing the probe's forward pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import spectral_lens as sl
from spectral_lens.records import RunWriter

from .model import ToyTransformer, norm
from .probes import fourier_summaries
from .train import forward_in_chunks

__all__ = ["ToyLens", "last_position_mask", "GRADIENT_PARAM"]

GRADIENT_PARAM = "blocks.{last}.attn.c_proj.weight"


def last_position_mask(batch) -> torch.Tensor:
    """Bool mask ``(B, T)`` selecting the last position of every example of ``(x, y)``."""
    x = batch[0]
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, -1] = True
    return mask


def _example_losses(logits: torch.Tensor, batch) -> torch.Tensor:
    return F.cross_entropy(logits, batch[1], reduction="none")



class Unmeasurable(FloatingPointError):
    """The lens could not measure a checkpoint whose validation loss (``val_loss``) is finite: the run stops
    there, kept as diverged, its record showing that finite loss (the speedrun's rule, review 26)."""

    def __init__(self, message: str, *, val_loss: float):
        super().__init__(message)
        self.val_loss = val_loss

class ToyLens:
    """Measure one toy model over a fixed held-out pool and append to its run record.

    Args:
        model: the model being trained.
        x, y: the held-out pool (contexts and targets).
        phase: the target's phase ``y - o`` of every pool example (for the Fourier probes).
        c: the cycle length.
        writer: the run's :class:`~spectral_lens.records.RunWriter`.
        gradient_samples: examples M of the per-sample gradient spectrum.
        batch: pool batch size of the activation pass (and of the validation / Fourier pass).
    """

    def __init__(self, model: ToyTransformer, x: torch.Tensor, y: torch.Tensor, phase: torch.Tensor, c: int,
                 writer: RunWriter, *, gradient_samples: int = 64, batch: int = 256):
        self.model, self.x, self.y, self.phase, self.c, self.writer = model, x, y, phase, c, writer
        self.batch = batch
        pool = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]
        last = len(model.blocks) - 1
        self.probe = sl.PerSampleGradientProbe(model, GRADIENT_PARAM.format(last=last), loss_fn=_example_losses,
                                               chunk_size=16)
        # the record's windows (the lens writes nothing itself; its summaries then match the record's)
        self.lens = sl.SpectralLens(model, pool, layers=f"blocks.{last}", mask_fn=last_position_mask,
                                    probe=self.probe, gradient_samples=gradient_samples,
                                    tail_window=writer.tail_window, head_window=writer.head_window)

    @torch.no_grad()
    def _probe_pass(self, fourier: bool = True) -> tuple[float, dict[str, float]]:
        was = self.model.training
        self.model.eval()
        try:
            h = forward_in_chunks(lambda x: self.model.hidden(x)[:, -1], self.x, self.batch)  # bit-identical, faster
            w = self.model.wte.weight if self.model.lm_head is None else self.model.lm_head.weight
            val = float(F.cross_entropy(norm(h) @ w.T, self.y))
            return val, fourier_summaries(h, self.phase, self.c) if fourier and math.isfinite(val) else {}
        finally:
            self.model.train(was)

    def measure(self, step: int, seen: int, progress: float) -> float:
        """Measure now, append the measurement (``tokens`` field = examples seen); return the val loss.

        A non-finite validation loss raises ``FloatingPointError`` before anything is measured; activations the
        lens cannot measure (``NonFiniteError``) raise :class:`Unmeasurable`, a ``FloatingPointError`` too: the
        run is kept as diverged (a ``ValueError`` failed the job, and every rerun trained into it again)."""
        val, fourier = self._probe_pass()
        if not math.isfinite(val):  # a diverged model: its spectra would be NaN, or fail to converge
            raise FloatingPointError(f"toy: validation loss {val} at step {step} ({seen} examples)")
        try:
            m = self.lens.measure(step, seen, val_loss=val, progress=progress)
        except sl.NonFiniteError as exc:  # activations beyond float32's range with a finite loss: as the speedrun's
            raise Unmeasurable(f"toy: the lens could not measure at step {step} ({seen} examples; validation "
                               f"loss {val:.4g}): {exc}", val_loss=val) from None
        scalars = {k: v for k, v in m.scalars.items() if k != "val_loss"}
        scalars.update(fourier)
        self.writer.log_measurement(step, seen, m.spectra, val_loss=val, progress=progress, scalars=scalars)
        return val

    @torch.no_grad()
    def val_loss(self) -> float:
        """Validation loss over the pool only (no spectra, no Fourier probes)."""
        return self._probe_pass(fourier=False)[0]
