"""Hugging Face ``transformers.Trainer`` callback (extra ``hf``: ``pip install 'spectral-lens[hf]'``)."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterable

import torch

from .._warnings import SpectralLensWarning
from ..gradients.losses import causal_lm_loss
from ..lens import SpectralLens
from ._driver import LensDriver
from ._require import require

_transformers = require("transformers", "hf", "spectral_lens.integrations.hf.SpectralLensCallback")

__all__ = ["SpectralLensCallback"]


def _smoothed_causal_lm_loss(output: Any, batch: Any, epsilon: float, ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence mean label-smoothed next-token cross-entropy, ``(M,)``: Hugging Face's ``LabelSmoother``
    per token (``(1 - eps) * nll + eps * mean over the vocabulary of -log p``, the same as ``F.cross_entropy``'s
    ``label_smoothing``), averaged over each sequence's non-ignored targets, with the default loss's targets and
    masks: :func:`~spectral_lens.gradients.causal_lm_loss` with ``label_smoothing=epsilon``, the probe's default
    loss during a measurement of a smoothing trainer (materialized; chunked through the head where the probe's
    ``head_loss`` chooses that). Computed in float32 or the logits' wider dtype."""
    return causal_lm_loss(output, batch, ignore_index, label_smoothing=epsilon)


class SpectralLensCallback(_transformers.TrainerCallback):
    """Measure spectra during ``transformers.Trainer.train()``.

    Build a :class:`~spectral_lens.SpectralLens` with the held-out pool (dict batches as the model
    takes them, on the model's device; padded positions are left out by default), either on the
    model you train or without a model (``SpectralLens(pool=...)``: the callback attaches it to the
    trainer's model for the run and detaches it afterwards), a
    :class:`~spectral_lens.records.RunWriter` and a :class:`~spectral_lens.Schedule`; the callback
    measures after every optimizer step the schedule names (``TrainerState.global_step``) and, with
    ``on_evaluate=True``, after every evaluation too (recording its ``eval_loss``, or the metric
    ``eval_loss_key`` names, as the validation loss; also a ``trainer.evaluate()`` before or after
    ``train()``). A step is measured once: an evaluation at a step the schedule already measured is
    not measured again, and its validation loss is appended to the run record's ``log.jsonl`` as a
    ``val_loss`` event (read by ``RunRecord.val_curve``) and logged as ``spectral_lens/val_loss``. With
    several evaluation datasets (a dict), name one of their losses, ``eval_loss_key="eval_<name>_loss"``: a callback added with
    :meth:`attach` measures (or keeps the loss) at that dataset's evaluation and passes over the
    others' at the same step; a key missing from the metrics warns and records no validation loss
    (a plain callback, which cannot see the trainer's datasets, warns at every other dataset's
    evaluation too). When
    ``train(resume_from_checkpoint=...)`` resumes a run, the measurements the lens recorded after the
    checkpoint's step are dropped first
    (:meth:`RunWriter.drop_after <spectral_lens.records.RunWriter.drop_after>`, with the
    ``log.jsonl`` rows after it; pass the run's writer with ``RunWriter(path, resume=True)``), so
    the record holds each step once. If training raises, the lens is detached from the model when
    the error came from a measurement, else when the callback next starts a run.

    The training loss the trainer logs (``logs["loss"]``, every ``logging_steps``) is appended to the
    run record's ``log.jsonl`` as a ``train_loss`` event at its step, with ``tokens_per_s``: the tokens
    trained since the previous event over the training time since then (measurements, evaluations and
    checkpoint saves left out; none when ``tokens`` counts steps). The report's training curve and
    throughput ``Q`` read these events. A run from step 0 that logged no loss (shorter than
    ``logging_steps``, or ``logging_strategy="no"``) records ``train()``'s final ``train_loss`` at its last step
    instead: the mean over all its steps, one point (with ``logging_strategy="no"``, the whole run's mean, far above
    its last loss in a long run; log every ``logging_steps`` for a curve). A pruned hyperparameter-search trial
    records none. Rank 0 writes
    them; under ``torch.distributed`` the ranks agree on each write (one small collective per logged
    loss), so a failed write raises on every rank.

    Each measurement is appended to the lens's run record, sent to every sink (e.g.
    :class:`~spectral_lens.integrations.TensorBoardSink`), and its scalars (per spectrum
    ``alpha_tail``, ``alpha_head``, ``rankme``, ``stable_rank``; ``noise_scale``) are logged:

    * through ``trainer.log`` (every ``report_to`` logger and ``trainer.state.log_history``) when the
      callback was added with :meth:`attach`;
    * otherwise, only into ``TrainerState.log_history`` (a plain ``TrainerCallback`` has no handle on
      the trainer's loggers).

    Args:
        lens: the configured ``SpectralLens`` (its ``schedule`` and ``writer`` are used), with or
            without a model.
        on_evaluate: also measure at every evaluation.
        tokens_per_step: training tokens per optimizer step, used when the trainer does not count
            input tokens (``TrainingArguments(include_num_input_tokens_seen=...)``); without
            either, ``tokens`` counts optimizer steps. Also recorded as the run record's
            ``RunInfo.tokens_per_step`` when that is ``None``.
        sinks: extra loggers with a ``log_measurement`` method.
        eval_loss_key: the evaluation metric recorded as the validation loss (``Trainer.evaluate``
            names it ``<metric_key_prefix>_loss``: ``eval_loss``, ``eval_<name>_loss`` for a dict of
            evaluation datasets).
    """

    def __init__(
        self,
        lens: SpectralLens,
        *,
        on_evaluate: bool = False,
        tokens_per_step: int | None = None,
        sinks: Iterable = (),
        eval_loss_key: str = "eval_loss",
    ) -> None:
        self.driver = LensDriver(lens, sinks, tokens_per_step)
        self.on_evaluate_ = bool(on_evaluate)
        self.eval_loss_key = str(eval_loss_key)
        self._warned_step: int | None = None  # the step of the last missing-key warning
        self._trainer = None  # attach()'s trainer: held until its train() begins, then weakly
        # whether this train() call started at step 0 and logged no training loss yet, and the (step, train_loss,
        # tokens seen) of its last log that looked like train()'s final metrics (see on_log)
        self._no_loss_yet = False
        self._final_loss: tuple | None = None

    @property
    def trainer(self):
        """The trainer :meth:`attach` added this callback to, while it is alive (else ``None``).

        Held strongly from :meth:`attach` until that trainer's ``train()`` begins, then weakly (the
        trainer holds its callbacks): a callback kept after training, to read its lens's history, does
        not keep the trainer, its model, optimizer and datasets alive."""
        t = self._trainer
        return t() if isinstance(t, weakref.ref) else t

    def attach(self, trainer) -> "SpectralLensCallback":
        """Add this callback to ``trainer`` and log its scalars through ``trainer.log``; returns self."""
        self.driver.bind(trainer.model, "SpectralLensCallback.attach")
        trainer.add_callback(self)
        self._trainer = trainer
        return self

    def _log_to(self, state):
        """The scalars' way to the trainer's loggers (see the class docstring), at ``state.global_step``
        (called on rank 0, agreed with the other ranks by the driver)."""
        step = int(state.global_step)

        def log(scalars: dict[str, float]) -> None:
            trainer = self._trainer_of(state)
            if trainer is not None:
                control = trainer.control
                should_log = control.should_log
                trainer.log(dict(scalars))
                # Trainer.log clears control.should_log (CallbackHandler.on_log): restore it, or the trainer's
                # own log of this step (its training loss) would be dropped
                control.should_log = trainer.control.should_log = should_log
            else:
                state.log_history.append({**scalars, "step": step})

        return log

    def _measure(self, state, args, val_loss: float | None = None) -> None:
        step = int(state.global_step)
        with self._trained_loss(state, args):
            self.driver.measure(step, self.driver.agreed_tokens(step, state.num_input_tokens_seen), val_loss,
                                log=self._log_to(state))

    def _trained_loss(self, state, args):
        """The per-sample loss the trainer trains on, for the lens's gradient probe during a measurement: with
        label smoothing (``TrainingArguments(label_smoothing_factor=eps)``; with :meth:`attach`, the trainer's
        ``label_smoother``, none when it has a ``compute_loss_func``) the default loss is the smoothed one
        (:func:`_smoothed_causal_lm_loss`; the probe carries ``eps``, so its ``head_loss`` can chunk it through
        the head as the plain loss); a probe with the user's ``loss_fn`` (or ``forward_fn``) is left as it is, and
        one built with its own ``label_smoothing`` keeps it."""
        probe = self.driver.lens.probe
        trainer = self._trainer_of(state)
        if trainer is not None:
            smoother = getattr(trainer, "label_smoother", None)
            eps = 0.0 if smoother is None or getattr(trainer, "compute_loss_func", None) is not None else smoother.epsilon
        else:
            eps = getattr(args, "label_smoothing_factor", 0.0) or 0.0
        if probe is None:
            return contextlib.nullcontext()
        own = probe.label_smoothing
        if own and own != float(eps):  # also when the trainer does not smooth: the probe measures another loss
            # given at rank 0's next agreed work (the measurement's sinks): raised as an error (-W error) on every
            # rank alike there, where a warning here, on rank 0 only, left the others in the measurement's collectives.
            # Once (once=True): queued again at each measurement until one gave it (a flag set here, when queued,
            # lost it where that measurement was skipped, non-finite, or raised: the user never saw it)
            self.driver.warn_on_rank0(
                f"SpectralLensCallback: the trainer trains with label_smoothing_factor={float(eps):g}, and the lens's "
                f"gradient probe was built with label_smoothing={own:g}: the probe's own value is measured (build "
                "it without label_smoothing to measure the trainer's loss)", once=True)
        return probe._trained_loss(float(eps)) if eps else contextlib.nullcontext()

    def _trainer_of(self, state):
        """:attr:`trainer` if ``state`` is its state (the callback runs in that trainer), else ``None``: a
        callback attached to one trainer and then added to another logs the other's run into its state."""
        trainer = self.trainer
        return trainer if trainer is not None and trainer.state is state else None

    def _names_another_dataset(self, state, metrics) -> bool:
        """Whether ``eval_loss_key`` names the loss of one of the attached trainer's evaluation datasets
        (a dict) and ``metrics`` are another one's (``eval_<other>_...``): that dataset's evaluation at
        the same step follows or came first."""
        datasets = getattr(self._trainer_of(state), "eval_dataset", None)
        if not isinstance(datasets, dict) or not any(self.eval_loss_key == f"eval_{n}_loss" for n in datasets):
            return False
        others = [f"eval_{n}_" for n in datasets if self.eval_loss_key != f"eval_{n}_loss"]
        return any(key.startswith(other) for key in metrics for other in others)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Attach a lens without a model to the trainer's model, else check that it is the lens's;
        when resuming from a checkpoint, drop what the lens recorded after its step."""
        if self._trainer is not None and not isinstance(self._trainer, weakref.ref):
            self._trainer = weakref.ref(self._trainer)  # its train() holds it from now on
        self.driver.bind(model, "SpectralLensCallback")
        self._no_loss_yet, self._final_loss = state.global_step == 0, None
        if state.global_step > 0:  # train(resume_from_checkpoint=...): the steps after it are replayed
            self.driver.resumed(state.global_step)
        else:
            self.driver.start()
        self.driver.training_starts(state.global_step, state.num_input_tokens_seen)

    def on_train_end(self, args, state, control, **kwargs):
        """Record the final ``train_loss`` of a run that logged no loss (see :meth:`on_log`); detach the lens if
        this callback attached it."""
        try:
            final, self._final_loss = self._final_loss, None
            if final is not None and self._no_loss_yet:  # the trainer calls this on every rank, as on_log
                self._no_loss_yet = False
                self.driver.record_train_loss(*final)
        finally:
            self.driver.release()

    def on_step_end(self, args, state, control, **kwargs):
        """Measure when the lens's schedule names this optimizer step."""
        self.driver.clock_stop()  # the step trained until now: a measurement is no training time
        if self.driver.due(int(state.global_step)):
            self._measure(state, args)
        self.driver.clock_run()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Record the training loss the trainer logs (``logs["loss"]``, every ``logging_steps``: its mean
        over the optimizer steps since its previous log) as a ``train_loss`` event with the throughput
        (``tokens_per_s``) since then; the time after this log (the trainer's evaluation and checkpoint)
        is no training time. A run that logged no loss (shorter than ``logging_steps``) records the
        ``train_loss`` of ``train()``'s final metrics instead, the trainer's mean over all its steps,
        at the last step: the same mean a log there would give (rank 0's own, not gathered). Only for a
        run from step 0: transformers 4 divides a resumed run's sum by all its steps. Recorded at
        :meth:`on_train_end` when that follows the final metrics' log: an evaluation with
        ``metric_key_prefix="train"`` (a training set's loss) logs ``train_loss`` and ``train_runtime`` too,
        and is followed by :meth:`on_evaluate` with those metrics, which forgets it (a pruned hyperparameter-search
        trial calls ``on_train_end`` right after an evaluation, without final metrics: nothing is recorded then);
        any other evaluation keeps a pending final loss (a callback ahead of this one that evaluates at the train
        end runs after the final metrics' log).
        With ``logging_strategy="no"`` that one point is the whole run's mean loss, at its last step.
        The trainer logs on every rank at the same steps, so the ranks agree there on rank 0's write
        (:meth:`LensDriver.record_train_loss`)."""
        logs = logs or {}
        loss = logs.get("loss")
        if loss is None and self._no_loss_yet and state.global_step > 0 and self._is_final_like(logs):
            self._final_loss = (int(state.global_step), logs["train_loss"], state.num_input_tokens_seen)
        if loss is not None and state.global_step > 0:
            self._no_loss_yet, self._final_loss = False, None
            self.driver.record_train_loss(int(state.global_step), loss, state.num_input_tokens_seen)
        self.driver.clock_run()

    @staticmethod
    def _is_final_like(metrics) -> bool:
        """Whether logged ``metrics`` look like ``train()``'s final metrics (``train_runtime`` and a ``train_loss``):
        those, or a training-set evaluation's (``metric_key_prefix="train"``), which :meth:`on_evaluate` then forgets."""
        return "train_runtime" in metrics and metrics.get("train_loss") is not None

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint was saved: its time is no training time."""
        self.driver.clock_run()

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """With ``on_evaluate=True``, measure now, recording the evaluation's ``eval_loss``; for a
        ``trainer.evaluate()`` outside ``train()``, a lens without a model is attached to the trainer's
        model for this measurement only."""
        # an evaluation's metrics were logged just before this (Trainer.evaluate logs, then calls on_evaluate): a
        # training-set evaluation's (metric_key_prefix="train") are not train()'s final metrics, which on_train_end
        # follows at once. Forgotten here, or a pruned Optuna trial (on_train_end right after the evaluation that
        # pruned it) recorded that evaluation's loss as the run's final train_loss. Only then: another evaluation
        # (a callback ahead of this one evaluating at on_train_end, after the final metrics) keeps the final loss
        if self._is_final_like(metrics or {}):
            self._final_loss = None
        try:
            self._on_evaluate(state, args, metrics, model)
        finally:
            self.driver.clock_run()  # the evaluation and its measurement took no training time

    def _on_evaluate(self, state, args, metrics, model) -> None:
        if not self.on_evaluate_:
            return
        val_loss = (metrics or {}).get(self.eval_loss_key)
        if val_loss is None and self._names_another_dataset(state, metrics or {}):
            return  # the evaluation of the dataset eval_loss_key names, at the same step, measures
        step = int(state.global_step)
        if val_loss is None and self._warned_step != step:  # e.g. another metric_key_prefix
            self._warned_step = step  # once per step (each dataset of a dict evaluates at that step)
            warnings.warn(
                f"SpectralLensCallback: eval_loss_key {self.eval_loss_key!r} is not among the evaluation's metrics "
                f"{sorted(metrics or {})}; the measurement at step {step} records no validation "
                "loss (pass eval_loss_key= one of those)",
                SpectralLensWarning,
                stacklevel=3,
            )
        if step == self.driver.last_step:  # measured at this step already: keep (and log) the loss
            self.driver.record_val_loss(step, self.driver.agreed_tokens(step, state.num_input_tokens_seen),
                                        None if val_loss is None else float(val_loss), log=self._log_to(state))
            return
        val_loss = None if val_loss is None else float(val_loss)
        if self.driver.lens.model is not None:  # in train(), or a lens built on the model
            self._measure(state, args, val_loss)
            return
        self.driver.bind(model, "SpectralLensCallback")  # trainer.evaluate() outside train()
        try:
            self._measure(state, args, val_loss)
        finally:
            self.driver.release()
