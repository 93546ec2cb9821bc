"""The hooks of the Lightning callback, shared by ``lightning.pytorch`` and ``pytorch_lightning``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Iterable

import torch

from .._agree import ranks
from .._warnings import SpectralLensWarning
from ..gradients._batch import default_forward
from ..lens import SpectralLens
from ._driver import LensDriver


def _lightning_pass_through(klass: type) -> bool:
    """Whether ``klass`` is Lightning's own ``LightningModule`` (of ``lightning.pytorch`` or ``pytorch_lightning``),
    whose ``forward`` only passes the call on to the next class's (``super().forward``). By module and name: a
    class of the user's that is also called ``LightningModule`` is not it."""
    return klass.__name__ == "LightningModule" and klass.__module__.split(".")[0] in ("lightning", "pytorch_lightning")


def _defines_forward(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` reaches a ``forward`` of its own rather than ``nn.Module``'s placeholder, which
    raises ``NotImplementedError``: one set on the instance (``module.forward = net.forward``), or the first one
    in its class's MRO past ``LightningModule``'s pass-through (so a mixin's after it counts). An instance
    ``forward`` that wraps the module's own method (``trainer.fit(torch.compile(module))`` sets one) is
    judged by that method."""
    mro, start = type(module).__mro__, 0
    own = vars(module).get("forward")
    if own is not None:
        try:
            own = inspect.unwrap(own)
        except ValueError:  # a __wrapped__ chain without end: some callable of the user's
            return True
        if getattr(own, "__self__", None) is not module:
            return True  # another callable (another module's forward, a function)
        found = [i for i, klass in enumerate(mro) if vars(klass).get("forward") is getattr(own, "__func__", None)]
        if not found:
            return True  # another method of the module's
        start = found[0]
    for klass in mro[start:]:
        if "forward" in vars(klass) and not _lightning_pass_through(klass):
            return klass is not torch.nn.Module
    return False


class LightningHooks:
    """Mixin with the callback's behaviour; each module combines it with its package's ``Callback``."""

    def __init__(
        self,
        lens: SpectralLens,
        *,
        on_validation: bool = False,
        val_loss_key: str = "val_loss",
        tokens_per_step: int | None = None,
        sinks: Iterable = (),
        train_loss_key: str | None = None,
    ) -> None:
        super().__init__()
        self.driver = LensDriver(lens, sinks, tokens_per_step)
        self.on_validation = bool(on_validation)
        self.val_loss_key = val_loss_key
        self.train_loss_key = None if train_loss_key is None else str(train_loss_key)
        self._batch_step: int | None = None  # trainer.global_step when the previous training batch ended
        # the returned training losses since the last train_loss event: their sum (a tensor on the loss's
        # device, read once per event) and count; the step of that event
        self._loss_sum = None
        self._loss_count = 0
        self._logged_step: int | None = None
        self._warned_train_key = False

    def __getstate__(self):
        # strategy="ddp_spawn" (and other spawning launchers) pickle the trainer with its callbacks into
        # new processes: the lens's measurements would stay in those copies, and a RunWriter's open file
        # descriptors mean nothing (or another file) in another process
        raise TypeError(
            f"{type(self).__name__} cannot be pickled, so it cannot run with strategy='ddp_spawn' (or another "
            "launcher that pickles the trainer into new processes): the lens would measure in copies that the "
            "main process never sees, and its RunWriter's open files do not carry over; use strategy='ddp' "
            "(Lightning re-runs your script for each rank) or torchrun, with the writer on rank 0 only"
        )

    @staticmethod
    def _log_to(trainer):
        """The scalars' way to every logger of ``trainer``, at its ``global_step`` (called on rank 0,
        agreed with the other ranks by the driver)."""
        step = int(trainer.global_step)

        def log(scalars: dict[str, float]) -> None:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

        return log

    def _measure(self, trainer, val_loss: float | None = None) -> None:
        step = int(trainer.global_step)
        self.driver.measure(step, self.driver.agreed_tokens(step), val_loss, log=self._log_to(trainer))

    def on_fit_start(self, trainer, pl_module) -> None:
        """Attach a lens without a model to ``pl_module``; else check that it is (or contains) the lens's.
        Refuse a model without a ``forward`` of its own that the lens would call (a ``LightningModule`` that
        only defines ``training_step``), now rather than at the first scheduled measurement."""
        lens = self.driver.lens
        model = pl_module if lens.model is None else lens.model
        probe = lens.probe
        spec = lens.params_spec  # params=() measures no gradients; otherwise the lens builds a probe on attach,
        builds = probe is None and not (isinstance(spec, (list, tuple)) and len(spec) == 0)  # calling forward
        calls = (lens.forward_fn is default_forward or builds
                 or (probe is not None and probe.forward_fn is default_forward))
        if model is not None and calls and not _defines_forward(model):
            raise TypeError(
                f"{type(self).__name__}: the SpectralLens would call {type(model).__name__}.forward on the pool's "
                f"batches, but {type(model).__name__} defines no forward (Lightning does not need one); build the "
                f"lens on the network the module trains (SpectralLens(module.net, pool, ...), whatever your "
                f"attribute is called), define forward, or pass forward_fn= to the lens and to its gradient probe (probe=PerSampleGradientProbe(..., "
                f"forward_fn=...); the probe the lens builds itself calls forward), or params=() for no gradients"
            )
        self.driver.bind(pl_module, type(self).__name__)

    def on_train_start(self, trainer, pl_module) -> None:
        """After ``fit(ckpt_path=...)`` restored a checkpoint, drop what the lens recorded after its step."""
        self._batch_step = self._logged_step = int(trainer.global_step)
        self._loss_sum, self._loss_count = None, 0
        if trainer.global_step > 0:
            self.driver.resumed(trainer.global_step)
        else:
            self.driver.start()
        self.driver.training_starts(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        """Record the training loss of the steps since the last ``train_loss`` event (a fit shorter than
        ``log_every_n_steps`` records one)."""
        if int(trainer.global_step) != self._logged_step:
            self._record_train_loss(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Detach the lens if this callback attached it."""
        self.driver.release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Detach the lens if this callback attached it (``on_fit_end`` does not run after an error); let go
        of the module as :meth:`teardown` does (which does not run after an error either)."""
        self.driver.release()
        self._forget_module()
        self._loss_sum, self._loss_count = None, 0

    def teardown(self, trainer, pl_module, stage) -> None:
        """At the end of every run (fit, validate, test, predict) let go of the module: see :meth:`_forget_module`."""
        self._forget_module()

    def _forget_module(self) -> None:
        """Drop the ``log`` / ``log_dict`` that Lightning sets on every callback at the start of each run
        (the ``LightningModule``'s bound methods, for a callback's own ``self.log``; the next run sets them
        again). Kept, they held the module, and through ``module.trainer`` the trainer, its optimizer and
        data loaders, for as long as the user kept this callback (to read ``lens.history``, say)."""
        for name in ("log", "log_dict"):
            self.__dict__.pop(name, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Start the clock again if a checkpoint stopped it (see :meth:`on_save_checkpoint`)."""
        self.driver.clock_resume()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """A checkpoint is about to be written (``ModelCheckpoint`` runs after the other callbacks, at a
        batch's end or after validation): its time is no training time, so the clock stops until the next
        training batch starts."""
        self.driver.clock_stop()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Measure when an optimizer step ran in this batch and the lens's schedule names the new
        ``trainer.global_step`` (with ``accumulate_grad_batches > 1``, not after a batch that only
        accumulated gradients), or a step the batch passed over (manual optimization with several
        ``optimizer.step()`` calls per batch advances ``global_step`` by more than one: the
        measurement is then taken, and recorded, at the batch's end step)."""
        self.driver.clock_stop()  # the batch trained until now: a measurement is no training time
        step, previous = int(trainer.global_step), self._batch_step
        self._batch_step = step
        if self.train_loss_key is None and self._records():
            self._add_loss(outputs, trainer, pl_module)
        every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
        if step != previous and every > 0 and step // every > (previous or 0) // every:  # a multiple of it passed
            self._record_train_loss(trainer)
        if step != previous and self.driver.due(step, since=previous):
            self._measure(trainer)
        self.driver.clock_run()

    def _records(self) -> bool:
        """Whether this process writes the run record (rank 0, with an open writer)."""
        writer = self.driver.lens.writer
        return writer is not None and not getattr(writer, "closed", False) and ranks(self.driver.lens.group)[0] == 0

    def _add_loss(self, outputs, trainer, pl_module) -> None:
        """Add the batch's training loss (``training_step``'s return value, as Lightning passes it on:
        divided by ``accumulate_grad_batches`` under automatic optimization) to the running sum; no
        device sync."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(()).float()  # a bfloat16 sum would round off
        elif not isinstance(loss, (int, float)) or isinstance(loss, bool):
            return  # nothing returned (manual optimization may return None)
        if getattr(pl_module, "automatic_optimization", True):
            loss = loss * max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        if self._loss_sum is None:  # a copy: under manual optimization loss is the module's own tensor
            self._loss_sum = loss.clone() if isinstance(loss, torch.Tensor) else loss
        else:
            self._loss_sum = self._loss_sum + loss
        self._loss_count += 1

    def _record_train_loss(self, trainer) -> None:
        """A ``train_loss`` event at ``trainer.global_step`` (with the throughput since the previous one):
        the mean of the returned losses since then, or ``trainer.callback_metrics[train_loss_key]``. Every
        rank calls it at the same steps (every ``log_every_n_steps``, and at the train end): rank 0 reads the
        loss and writes, and the ranks agree on its success (:meth:`LensDriver.record_train_loss`)."""
        step = int(trainer.global_step)
        self._logged_step = step
        loss_sum, count = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        self.driver.record_train_loss(step, lambda: self._train_loss(trainer, step, loss_sum, count))

    def _train_loss(self, trainer, step: int, loss_sum, count: int) -> float | None:
        """The loss of the event at ``step`` (``None``: none to record); the driver calls it on rank 0, with an
        open writer. (Its warnings' stacklevel 8: Lightning's hook call, through the driver's agreement.)"""
        if self.train_loss_key is None:
            if not count and not self._warned_train_key:
                self._warned_train_key = True
                warnings.warn(
                    f"{type(self).__name__}: training_step returned no loss (a scalar tensor or a dict with 'loss') "
                    f"in the batches up to step {step}, so no training loss is recorded; return it, or log it with "
                    "self.log and pass train_loss_key= its name", SpectralLensWarning, stacklevel=8)
            return None if not count else float(loss_sum) / count  # the one device sync per event
        value = trainer.callback_metrics.get(self.train_loss_key)
        if value is None and not self._warned_train_key:
            self._warned_train_key = True
            warnings.warn(
                f"{type(self).__name__}: train_loss_key {self.train_loss_key!r} is not among the logged metrics "
                f"{sorted(trainer.callback_metrics)} at step {step}; no training loss is recorded there (log it "
                "with self.log in training_step, or pass train_loss_key=None for the loss training_step returns)",
                SpectralLensWarning, stacklevel=8)
        return None if value is None else float(value)

    def on_validation_end(self, trainer, pl_module) -> None:
        """With ``on_validation=True``, measure after each validation run of ``fit`` (not the sanity
        check, nor ``trainer.validate()``, which runs outside training and under inference mode)."""
        try:
            self._on_validation_end(trainer)
        finally:
            self.driver.clock_run()  # the validation and its measurement took no training time

    def _on_validation_end(self, trainer) -> None:
        if not self.on_validation or trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit":
            return
        value = trainer.callback_metrics.get(self.val_loss_key)
        step = int(trainer.global_step)
        if value is None:
            # e.g. several validation dataloaders, whose metrics Lightning logs as "val_loss/dataloader_idx_0", ...
            # Rank 0's loss is the one recorded (it writes the record and decides in record_val_loss), so only rank 0's
            # metrics matter: a val_loss logged with self.log(..., rank_zero_only=True) is missing on the other ranks
            # alone, which stay quiet. Given at rank 0's agreed work (the measurement's or the kept loss's), so a
            # warning raised as an error raises on every rank together, with no collective of its own
            self.driver.warn_on_rank0(
                f"{type(self).__name__}: val_loss_key {self.val_loss_key!r} is not among the logged metrics "
                f"{sorted(trainer.callback_metrics)} on rank 0; the measurements after validation record no "
                "validation loss (pass val_loss_key= one of those)")
        if step == self.driver.last_step:  # measured at this step already: keep (and log) the loss
            self.driver.record_val_loss(step, self.driver.agreed_tokens(step), None if value is None else float(value),
                                        log=self._log_to(trainer))
            return
        self._measure(trainer, None if value is None else float(value))

