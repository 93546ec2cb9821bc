"""Lightning callback for ``lightning.pytorch`` (extra ``lightning``: ``pip install 'spectral-lens[lightning]'``)."""

from __future__ import annotations

from ._lightning_hooks import LightningHooks
from ._require import require

_pl = require("lightning.pytorch", "lightning", "spectral_lens.integrations.lightning.SpectralLensLightningCallback")

__all__ = ["SpectralLensLightningCallback"]


class SpectralLensLightningCallback(LightningHooks, _pl.Callback):
    """Measure spectra during ``Trainer.fit()``.

    Build a :class:`~spectral_lens.SpectralLens` on the ``LightningModule`` or on the inner model it
    trains, or without a model (``SpectralLens(pool=...)``: the callback attaches it to the
    ``LightningModule`` for the fit and detaches it afterwards), with its held-out pool, a :class:`~spectral_lens.records.RunWriter` and a
    :class:`~spectral_lens.Schedule` (pass ``forward_fn=`` when the module's ``forward`` does not
    take the pool's batches; a ``LightningModule`` without a ``forward`` of its own, which Lightning allows, is
    refused with a ``TypeError`` when the fit starts: build the lens on the network it trains). The callback
    measures after every optimizer step the schedule names
    (``trainer.global_step``; with ``accumulate_grad_batches > 1``, after the batch that stepped) and,
    with ``on_validation=True``, after every validation run of the fit, recording
    ``trainer.callback_metrics[val_loss_key]`` as the validation loss (``trainer.validate()`` and
    ``trainer.test()`` do not measure). A step is measured once per fit: a validation run at a step the
    schedule already measured is not measured again, and its validation loss is appended to the run
    record's ``log.jsonl`` as a ``val_loss`` event (read by ``RunRecord.val_curve``) and logged as
    ``spectral_lens/val_loss``. When ``fit(ckpt_path=...)``
    resumes a run, the measurements the lens recorded after the checkpoint's step are dropped first
    (:meth:`RunWriter.drop_after <spectral_lens.records.RunWriter.drop_after>`, with the
    ``log.jsonl`` rows after it; pass the run's writer with ``RunWriter(path, resume=True)``), so
    the record holds each step once. A lens
    the callback attached is detached at the end of the fit, also when it raises.

    Every ``trainer.log_every_n_steps`` optimizer steps, and at the end of the fit, a ``train_loss``
    event is appended to the run record's ``log.jsonl``: the mean of the losses ``training_step``
    returned since the previous one (summed on their device, read once per event), or
    ``trainer.callback_metrics[train_loss_key]``, with ``tokens_per_s``, the tokens trained since the
    previous event over the training time since then (measurements, validation and checkpoint writes
    left out; none without ``tokens_per_step``). A ``training_step`` that returns no loss (manual
    optimization may return nothing) warns once: pass ``train_loss_key=``. The report's training
    curve and throughput ``Q`` read these events. Rank 0 writes them; under ``torch.distributed`` the
    ranks agree on each write (one small collective per event), so a failed write raises on every rank.

    Each measurement is appended to the lens's run record, sent to every sink, and its scalars (per
    spectrum ``alpha_tail``, ``alpha_head``, ``rankme``, ``stable_rank``; ``noise_scale``) go to
    every logger of the trainer (``trainer.loggers``: TensorBoard, CSV, W&B, ...).

    Args:
        lens: the configured ``SpectralLens`` (its ``schedule`` and ``writer`` are used), with or
            without a model.
        on_validation: also measure after every validation run.
        val_loss_key: the logged metric recorded as validation loss (with several validation
            dataloaders Lightning logs ``val_loss/dataloader_idx_0``, ...); a key that is not among
            ``trainer.callback_metrics`` after a validation run warns (``SpectralLensWarning``), on rank 0
            only: rank 0's loss is the one recorded (a ``self.log(..., rank_zero_only=True)`` metric is fine).
        tokens_per_step: training tokens per optimizer step (records' ``tokens``; also the run record's
            ``RunInfo.tokens_per_step`` when that is ``None``); without it, ``tokens`` counts optimizer steps
            (and no ``tokens_per_s`` is recorded).
        sinks: extra loggers with a ``log_measurement`` method.
        train_loss_key: the logged metric recorded as the training loss (e.g. one logged with
            ``self.log("train_loss", loss, sync_dist=True)``); default ``None``: the mean of the losses
            ``training_step`` returned (rank 0's own batches). A key that is not among
            ``trainer.callback_metrics`` when an event is due warns once (``SpectralLensWarning``).
    """

