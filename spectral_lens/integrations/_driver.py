"""What every framework callback does at a checkpoint: measure, record, fan out to sinks."""

from __future__ import annotations

import inspect
import numbers
import time
import warnings
import weakref
from typing import Any, Iterable, Protocol

from .._agree import agree, from_rank0, global_rank, out_of_step, peers_max, ranks
from .._warnings import NonFiniteError, SpectralLensWarning
from ..attachment import Attachment
from ..lens import LensMeasurement, SpectralLens
from ..records import RunWriter
from .summaries import measurement_scalars

_STEPS_WARNING = (
    "spectral-lens callback: the trainer counts no input tokens and no tokens_per_step was given, so the run record's "
    "tokens count optimizer steps, which the early prediction and the reports read as tokens (against "
    "RunInfo.total_tokens); pass the callback tokens_per_step= (training tokens per optimizer step), or with the "
    "Hugging Face Trainer TrainingArguments(include_num_input_tokens_seen=True)"
)

# The attachment a callback made for each lens it attached (a lens built without a model). When a
# run raised, its end hook never ran and the lens is still bound to that run's model; the next
# callback run of the lens re-attaches it to its own model instead of refusing it. The attachment is
# held weakly (the lens keeps its current one): a strong value would refer to its key (attachment.owner
# is the lens), so no entry, lens, pool or history would ever be freed.
_CALLBACK_ATTACHMENTS: "weakref.WeakKeyDictionary[SpectralLens, weakref.ref[Attachment]]" = weakref.WeakKeyDictionary()


def _this_rank() -> int:
    """This process's global rank (0 outside ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Sink(Protocol):
    """Anything with ``log_measurement(measurement, tail=..., head=...)`` (see TensorBoardSink), and
    optionally ``resumed(step)``, called on rank 0 when training resumes from a checkpoint at ``step``,
    and ``log_val_loss(step, val_loss)``, called on rank 0 with a validation loss kept at a step already
    measured without one (:meth:`LensDriver.record_val_loss`), so the sink's ``val_loss`` curve has the
    steps the run record has (a ``log_val_loss`` that cannot be called so is refused when the driver is built)."""

    def log_measurement(self, measurement: LensMeasurement, tail=..., head=...) -> None: ...


def _check_log_val_loss(sink) -> None:
    """Refuse a sink whose ``log_val_loss`` cannot be called as ``log_val_loss(step, val_loss)`` (a method of that
    name the sink had for its own use): now, not at the first kept validation loss, hours into the training."""
    method = getattr(sink, "log_val_loss", None)
    if not callable(method):
        return
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # a builtin without a signature: called as the protocol says
        return
    try:
        signature.bind(0, 0.0)
    except TypeError:
        raise TypeError(
            f"sink {type(sink).__name__}'s log_val_loss{signature} cannot be called as log_val_loss(step, val_loss), "
            "which the callbacks call on rank 0 with a validation loss kept at an already measured step; give it "
            "that signature, or rename the method") from None


class LensDriver:
    """Runs a configured :class:`~spectral_lens.SpectralLens` for a framework callback.

    Measures at most once per step; rank 0 sends the measurement to every sink and returns its
    flat scalars (other ranks measure with it, as ``SpectralLens`` needs, and return ``{}``).
    """

    def __init__(self, lens: SpectralLens, sinks: Iterable[Sink], tokens_per_step: int | None) -> None:
        if not isinstance(lens, SpectralLens):
            raise TypeError(f"expected a spectral_lens.SpectralLens, got {type(lens).__name__}")
        # an integer, as the record's tokens and RunInfo.tokens_per_step are (a fraction was counted
        # int(step * n) and recorded in run.json as int(n)); NumPy integers are taken as Python ints
        if tokens_per_step is not None and (isinstance(tokens_per_step, bool) or not isinstance(
                tokens_per_step, numbers.Integral) or tokens_per_step < 1):
            raise ValueError(f"tokens_per_step must be a positive integer, got {tokens_per_step!r}")
        self.lens = lens
        self.sinks = list(sinks)
        for s in self.sinks:
            if not callable(getattr(s, "log_measurement", None)):
                raise TypeError(f"sink {type(s).__name__} has no log_measurement(measurement, tail=, head=) method")
            _check_log_val_loss(s)
        self.tokens_per_step = None if tokens_per_step is None else int(tokens_per_step)
        self._warned_info = False  # the run record's RunInfo.tokens_per_step differs from tokens_per_step: said once
        self._warned_steps = False  # tokens() fell back to step counts and said so once
        self._steps_pending = False  # agreed_tokens() fell back to step counts: rank 0's next agreed work says so
        self._pending_warnings: list[str] = []  # warn_on_rank0(): given at rank 0's next agreed work
        self._once: set[str] = set()  # warn_on_rank0(once=True)'s messages; those given already:
        self._given_once: set[str] = set()
        self.last_step: int | None = None
        self.last_has_val_loss = False  # whether the record holds a validation loss at last_step
        self.handle = None
        # the throughput's interval: tokens at its start, training seconds in it, when the clock last ran on
        self._interval_tokens: int | None = None  # None: no training started
        self._train_s = 0.0
        self._clock_from: float | None = None

    def release(self) -> None:
        """Detach the lens again if :meth:`bind` attached it."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def bind(self, model: Any, where: str) -> None:
        """Attach a lens built without a model (``SpectralLens(pool=...)``) to the trained ``model``;
        for a lens with a model, raise when ``model`` neither is nor contains it.

        A lens a callback attached to the model of an earlier run that raised (so its end hook never
        detached it) is re-attached to ``model``; a model the user bound the lens to is never replaced.
        """
        if model is None:
            return
        lens = self.lens
        earlier = _CALLBACK_ATTACHMENTS.get(lens, lambda: None)()
        if earlier is not None and earlier.active:
            if lens.model is model:
                self.handle = earlier  # this run's own attachment (bound in attach(), then at train begin)
                return
            earlier.remove()
        if lens.model is None:
            self.handle = lens.attach(model)
            _CALLBACK_ATTACHMENTS[lens] = weakref.ref(self.handle)
            return
        if not any(m is lens.model for m in model.modules()):
            theirs, ours = type(model).__name__, type(lens.model).__name__
            what = f"another {theirs} instance" if theirs == ours else theirs
            raise ValueError(
                f"{where}: the trainer's model ({what}) is not the model the SpectralLens measures ({ours}) and does "
                f"not contain it; build the lens on the model you train, or without a model (SpectralLens(pool=...)) "
                f"for the callback to attach it"
            )

    def start(self) -> None:
        """A run starts from step 0: forget the step an earlier run of this callback measured last, so
        that step is measured again when the new run reaches it. A measurement at step 0 itself (a
        ``trainer.evaluate()`` just before ``train()``) stands: the run starts from those weights."""
        if self.last_step != 0:
            self.last_step = None
            self.last_has_val_loss = False

    def resumed(self, step: int) -> None:
        """Training resumed from a checkpoint at ``step``: forget what the lens measured after it
        (its history, and on rank 0 its run record via :meth:`RunWriter.drop_after
        <spectral_lens.records.RunWriter.drop_after>`, and each sink's ``resumed(step)`` where it has
        one), since those steps are trained and measured again. ``step`` itself counts as measured
        (an evaluation there keeps only its loss) when the history or rank 0's run record holds a
        measurement at it; otherwise an evaluation at ``step`` measures. When rank 0's run record also
        holds a validation loss at ``step`` (in the measurement or a ``val_loss`` event), that loss
        stands: an evaluation at ``step`` after the resume appends none, so the step keeps one loss.
        Under tensor parallelism with a group holding one rank of each mesh, both (and a failure of rank 0's
        writer here) are agreed with the mesh peers too (:meth:`_with_mesh_peers`)."""
        step = int(step)
        lens = self.lens
        lens.history[:] = [m for m in lens.history if m.step <= step]
        measured = [any(m.step == step for m in lens.history)]
        has_loss = [False]  # whether rank 0's run record holds a validation loss at step

        def on_rank0() -> None:
            if lens.writer is not None:
                lens.writer.drop_after(step)
                measured[0] = measured[0] or step in lens.writer.measured_steps()
                has_loss[0] = step in lens.writer.val_loss_steps()
            for sink in self.sinks:
                if callable(getattr(sink, "resumed", None)):
                    sink.resumed(step)

        what = "dropping the records after the checkpoint"
        error = None
        try:
            self._agreed_on_rank0(on_rank0, what, peers=False)  # (the mesh peers: below, with the decisions)
            # the checkpoint's step counts as measured only when it was (in this process's history or, on
            # rank 0, in the run record): an evaluation at the restored step (eval_on_start) measures otherwise;
            # a validation loss recorded there before the resume stands (an evaluation there appends none)
            measured, has_loss = from_rank0(self.lens.group, (measured[0], has_loss[0]), self.lens.model)
        except BaseException as exc:  # noqa: BLE001 - an interrupt too: told to the mesh peers below, then re-raised
            error, measured, has_loss = exc, False, False
        try:
            # under tensor parallelism with a group holding one rank of each mesh (a data-parallel group), rank 0's
            # mesh peers are in other groups, whose rank 0 has no record: whether an evaluation at step measures (a
            # measurement: collectives of the mesh), and a failure above (rank 0's writer), are agreed with them too
            # (before, a restarted peer measured alone, or went on training alone, and waited until the timeout)
            measured, has_loss = self._with_mesh_peers(error, what, (int(measured), int(has_loss)))
        except BaseException:
            self.release()  # the run ends with this error
            raise
        self.last_step = step if measured else None
        self.last_has_val_loss = bool(measured and has_loss)

    def training_starts(self, step: int, counted: int | None = None) -> None:
        """``train()`` / ``fit()`` starts (or resumes) at ``step``: the first interval of the logged
        throughput starts here, with the clock running."""
        self._interval_tokens = self._counted_tokens(step, counted)
        self._train_s = 0.0
        self._clock_from = time.perf_counter()

    def clock_stop(self) -> None:
        """Training pauses (a step ended: the lens may measure, the trainer evaluate or save): the time
        since :meth:`clock_run` counts as training time."""
        if self._clock_from is not None:
            self._train_s += time.perf_counter() - self._clock_from
            self._clock_from = None

    def clock_run(self) -> None:
        """Training goes on from now (after a measurement, an evaluation, a checkpoint, the trainer's log)."""
        self._clock_from = time.perf_counter()

    def clock_resume(self) -> None:
        """Training goes on from now if the clock was stopped (:meth:`clock_stop` while a checkpoint was
        written); a running clock runs on."""
        if self._clock_from is None and self._interval_tokens is not None:
            self._clock_from = time.perf_counter()

    def _real_tokens(self, counted: int | None) -> bool:
        """Whether :meth:`tokens` counts tokens (the framework's count or ``tokens_per_step``), not steps."""
        return bool(counted) or self.tokens_per_step is not None

    def record_train_loss(self, step: int, train_loss, counted: int | None = None) -> None:
        """Append a ``train_loss`` event at ``step`` to rank 0's run record, with ``tokens_per_s``: the
        tokens trained since the previous event (or since training started) over the training time
        between them, the time of measurements, evaluations and checkpoints left out. No
        ``tokens_per_s`` when the record's tokens count optimizer steps (no token count, no
        ``tokens_per_step``). ``train_loss``: the loss, or a function that gives it (or ``None``:
        nothing to record), called on rank 0 only (a device sync). Every rank calls this at the same
        steps (the logging cadence): rank 0 writes and the ranks agree on its success, one small
        collective per event (none in a single process; one more over the tensor-parallel mesh where the group
        holds one rank of each mesh), so a failed write (a full disk) raises on every rank instead of leaving the
        others in the training's next collective. A closed writer,
        or a lens without one, records nothing."""
        tokens = self.agreed_tokens(step, counted)
        start, train_s = self._interval_tokens, self._train_s
        self._interval_tokens, self._train_s = tokens, 0.0
        real = self._real_tokens(counted)

        def on_rank0() -> None:
            writer = self.lens.writer
            if writer is None or getattr(writer, "closed", False):
                return
            loss = train_loss() if callable(train_loss) else train_loss
            if loss is None:
                return
            event = {"train_loss": float(loss)}
            if real and start is not None and tokens > start and train_s > 0:
                event["tokens_per_s"] = (tokens - start) / train_s
            writer.log(step, tokens, **event)

        self._agreed_on_rank0(on_rank0, "recording the training loss (rank 0 writes it)")

    def record_val_loss(self, step: int, tokens: int, val_loss: float | None, log=None) -> None:
        """An evaluation ran at ``step``, which the lens already measured (the schedule came first):
        the measurement is not repeated, but its validation loss is kept, as a ``val_loss`` event in the
        run record's ``log.jsonl`` on rank 0 (read by ``RunRecord.val_curve``, ``tokens_to_target`` and
        the reports), unless the record already holds one at this step or the writer was closed. ``log``:
        called on rank 0 with ``{"spectral_lens/val_loss": loss}`` when the loss is kept (also by a lens
        without a writer), and each sink's ``log_val_loss(step, loss)`` where it has one, so the loggers'
        and the sinks' curves have the steps the record has, each once (a measurement with a loss logs it
        with its scalars). Rank 0 decides, with its own loss, and every rank makes the
        agreement's one collective (none in a single process) whatever its own: a loss only rank 0 has (a
        Lightning metric logged on rank 0 alone) left rank 0 waiting in it while the others returned."""
        lens = self.lens

        def on_rank0() -> None:
            if val_loss is None or self.last_has_val_loss:
                return
            writer = lens.writer
            # a writer the user closed after train()/fit() (then trainer.evaluate()): nothing to append to
            if writer is not None and getattr(writer, "closed", False):
                return
            if writer is not None:
                writer.log(step, tokens, val_loss=float(val_loss))
            for sink in self.sinks:
                if callable(getattr(sink, "log_val_loss", None)):
                    sink.log_val_loss(step, float(val_loss))
            if log is not None:
                log({"spectral_lens/val_loss": float(val_loss)})

        self._agreed_on_rank0(on_rank0, "recording the validation loss")
        self.last_has_val_loss = self.last_has_val_loss or val_loss is not None

    def warn_on_rank0(self, message: str, once: bool = False) -> None:
        """Warn (``SpectralLensWarning``) on rank 0 only, at its next agreed work (:meth:`_agreed_on_rank0`: a
        measurement's sinks, a loss event), as :meth:`agreed_tokens` does: about something only rank 0's value
        decides (rank 0 writes the record), and raised as an error (``-W error``) on every rank alike. Call it on
        every rank before that work; the other ranks drop it. A measurement that is skipped or raises drops it too
        (it was about that measurement). ``once``: given once by this driver (the run's setup, not one
        measurement's): call it before each measurement it concerns; a message pending or given already is not
        queued again, and one that a skipped or failed measurement dropped is queued again by the next call
        (before, a caller's own once-flag, set when queued, lost it: the user never saw it)."""
        if ranks(self.lens.group)[0] != 0:
            return
        message = str(message)
        if once:
            if message in self._given_once or message in self._pending_warnings:
                return
            self._once.add(message)
        self._pending_warnings.append(message)

    def _agreed_on_rank0(self, work, what: str, peers: bool = True) -> None:
        """Run ``work()`` on rank 0 of the lens's group; then every rank agrees (one collective) on
        whether it succeeded, so a failure there (a full disk, a sink's error) makes every rank raise at
        once instead of leaving the others waiting in the training loop's next collective. Rank 0 first gives
        :meth:`agreed_tokens`'s and :meth:`warn_on_rank0`'s pending warnings, so one raised as an error is
        agreed too. ``peers``: then with the tensor-parallel mesh peers too (:meth:`_with_mesh_peers`), where the
        group holds one rank of each mesh (``False``: the caller does it, with its own decisions)."""
        error = None
        if ranks(self.lens.group)[0] == 0:
            try:
                if self._steps_pending:
                    self._steps_pending, self._warned_steps = False, True
                    warnings.warn(_STEPS_WARNING, SpectralLensWarning, stacklevel=3)
                pending, self._pending_warnings = self._pending_warnings, []
                for message in pending:
                    if message in self._once:  # given (also when raised as an error: the user saw it)
                        self._given_once.add(message)
                    warnings.warn(message, SpectralLensWarning, stacklevel=3)
                self._record_tokens_per_step()
                work()
            except BaseException as exc:  # an interrupt too: agreed below, then re-raised on rank 0
                error = exc
        if not peers:
            agree(self.lens.group, error, what, self.lens.model)  # (under NCCL: measure's device, the model's GPU)
            return
        try:
            agree(self.lens.group, error, what, self.lens.model)
        except BaseException as exc:  # noqa: BLE001 - this rank's own error or its group's: told to the mesh peers
            error = exc
        self._with_mesh_peers(error, what)

    def _with_mesh_peers(self, error: BaseException | None, what: str, values: tuple[int, ...] = ()) -> tuple[int, ...]:
        """After an agreement over the lens's group: ``error`` (this rank's, or its group's as :func:`agree` raised it)
        and ``values`` agreed with this rank's tensor-parallel mesh peers where the group holds one rank of each mesh
        (:func:`~spectral_lens._agree.peers_max`: one ``all_reduce``, on success and on failure alike; none for a
        plain model, one replica or a single process). The group's rank 0 did the work, so a failed group (an
        ``Exception``: the agreement's, or rank 0's own) failed on its global rank, which the peers name; an interrupt
        (a ``BaseException`` that is not an ``Exception``, e.g. Ctrl-C inside the agreement) is this rank's own, named
        as this rank (before, as the group's rank 0, which went on). Why: those peers are in other groups; before,
        rank 0's group raised while they went on into the training's next tensor-parallel forward alone, and waited
        there until the process-group timeout. An ``error`` that left the collectives out of step starts no collective. Raises
        ``error``, or on a peer of a failed rank a ``RuntimeError`` naming it; returns ``values`` maxed over the
        peers."""
        failed_at = 0 if error is None else 1 + (global_rank(self.lens.group, 0)
                                                 if isinstance(error, Exception) and ranks(self.lens.group)[1] > 1
                                                 else _this_rank())
        got = (failed_at, *values)
        if error is None or not out_of_step(error):  # (one that left the collectives out of step: no more)
            try:
                got = peers_max(self.lens.model, self.lens.group, got)
            except BaseException:
                if error is None:
                    raise
        if error is not None:
            raise error
        if got[0]:
            raise RuntimeError(
                f"spectral-lens callback: {what} failed on a tensor-parallel mesh peer of global rank "
                f"{_this_rank()} (this rank) or in that peer's group=: on global rank {got[0] - 1} (the lens's "
                "group holds one rank of each mesh); every rank raises so that none waits in the next forward: "
                "see that rank's error")
        return got[1:]

    def _record_tokens_per_step(self) -> None:
        """On rank 0: fill the run record's ``RunInfo.tokens_per_step`` (``run.json``, rewritten atomically)
        with the callback's ``tokens_per_step`` when the ``RunInfo`` left it out, as the record's tokens are
        counted with it (``spectral-lens inspect`` shows it; the noise-scale baseline in tokens reads it).
        A ``RunInfo`` value that differs is kept, and warned about once. Runs inside each agreed work
        (:meth:`_agreed_on_rank0`), so a failed write or a warning raised as an error is agreed too."""
        writer, n = self.lens.writer, self.tokens_per_step
        if n is None or not isinstance(writer, RunWriter) or writer.closed:
            return
        info = writer.info
        if info.tokens_per_step is None:
            writer.fill_tokens_per_step(n)
        elif info.tokens_per_step != n and not self._warned_info:
            self._warned_info = True
            warnings.warn(
                f"spectral-lens callback: the run record {writer.path} has RunInfo.tokens_per_step="
                f"{info.tokens_per_step!r}, but the callback was given tokens_per_step={n!r} (the record's tokens are "
                "step * tokens_per_step unless the trainer counts input tokens); run.json keeps its value: pass "
                "the callback and the RunInfo the same number",
                SpectralLensWarning, stacklevel=4)

    def windows(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """The alpha windows of the lens's summaries (the run record's, else the depth rule's).

        Shaded in the sinks' figures; also used for spectra whose summaries a measurement does not carry.
        """
        return self.lens._windows()

    def tokens(self, step: int, counted: int | None = None) -> int:
        """Training tokens at ``step``: the framework's count when it keeps one, else
        ``step * tokens_per_step``, else ``step`` (tokens then count optimizer steps)."""
        if self._counts_steps(counted):
            self._warned_steps = True
            warnings.warn(_STEPS_WARNING, SpectralLensWarning, stacklevel=2)
        return self._counted_tokens(step, counted)

    def agreed_tokens(self, step: int, counted: int | None = None) -> int:
        """:meth:`tokens`, for a callback's hook that every rank runs: its warning (given on rank 0 only, where the
        writer is) waits for rank 0's next agreed work (:meth:`_agreed_on_rank0`: a measurement's sinks, a loss
        event), so a warning raised as an error (``-W error``) makes every rank raise; raised at once, it left the
        other ranks waiting in the next collective until the process-group timeout."""
        if self._counts_steps(counted):
            self._steps_pending = True
        return self._counted_tokens(step, counted)

    def _counts_steps(self, counted: int | None) -> bool:
        """Whether the record's tokens count optimizer steps and that was not said yet."""
        return not counted and self.tokens_per_step is None and self.lens.writer is not None and not self._warned_steps

    def _counted_tokens(self, step: int, counted: int | None = None) -> int:
        return int(counted) if counted else int(step) * (self.tokens_per_step or 1)

    def due(self, step: int, since: int | None = None) -> bool:
        """Whether the lens's schedule asks for ``step`` (or, with ``since``, for any step after
        ``since`` up to ``step``: several optimizer steps in one batch) and it was not measured yet."""
        schedule = self.lens.schedule
        if schedule is None or step == self.last_step:
            return False
        first = step if since is None else min(since + 1, step)
        return any(s in schedule for s in range(first, step + 1))

    def measure(self, step: int, tokens: int, val_loss: float | None = None, log=None) -> dict[str, float]:
        """Measure now; fan out to the sinks on rank 0 and return the flat scalars there (``{}`` on the
        other ranks). ``log``: called with the scalars on rank 0 after the sinks (the framework's own
        loggers). An error of a sink or of ``log`` on rank 0 is agreed with the other ranks: every
        rank raises (the tensor-parallel mesh peers too, where the group holds one rank of each mesh). A measurement that finds non-finite hidden states or gradients (a diverged run) is
        skipped with a warning on every rank (``{}``): measuring does not end the training; so is one whose run
        record rank 0 closed already (agreed with the tensor-parallel mesh peers too, where the group holds one
        rank of each mesh, with a failure of that decision, an interrupt included: :meth:`_with_mesh_peers`). Rank 0's
        record write inside ``SpectralLens.measure`` is agreed with them by the lens itself."""
        writer = self.lens.writer
        try:
            error, closed = None, False
            try:
                closed = from_rank0(self.lens.group, writer is not None and bool(getattr(writer, "closed", False)),
                                    self.lens.model)
            except BaseException as exc:  # noqa: BLE001 - an interrupt too (Ctrl-C as the broadcast returns): told
                error = exc                 # to the mesh peers below, then re-raised
            # and the tensor-parallel mesh peers where the group holds one rank of each mesh (a data-parallel group):
            # rank 0's peers are in other groups, whose rank 0 has no writer; before, they measured and waited in the
            # peers' check of the measurement until the process-group timeout (one all-reduce more; none otherwise).
            # A failure above is agreed in the same all-reduce (before, an interrupted rank left its peers waiting in
            # it until the timeout)
            (closed,) = self._with_mesh_peers(error, "deciding whether rank 0's run record is closed",
                                              (int(bool(closed)),))
            if closed:
                # the user closed the run record after train()/fit() (the guides do), then evaluated again:
                # nothing to record into; every rank skips alike (the writer lives on rank 0 only)
                warnings.warn(f"spectral-lens: the lens's RunWriter ({getattr(writer, 'path', 'rank 0')}) is closed, so "
                              f"the measurement due at step {step} is skipped; close the writer after the last "
                              "evaluation to record it", SpectralLensWarning, stacklevel=3)
                self._pending_warnings.clear()  # about what this measurement would have recorded
                return {}
            try:
                m = self.lens.measure(step, tokens, val_loss=val_loss)
            except NonFiniteError as exc:  # on every rank alike (agreed by the lens)
                # non-finite hidden states or gradients: a run that diverged. The training goes on as it
                # would without the callback; its logged losses (train_loss events) show the divergence
                warnings.warn(f"spectral-lens: the measurement at step {step} is skipped (the training goes on): "
                              f"{exc}", SpectralLensWarning, stacklevel=3)
                self._pending_warnings.clear()  # about what this measurement would have recorded
                return {}
            self.last_step = step
            self.last_has_val_loss = val_loss is not None
            tail, head = self.windows()
            scalars: dict[str, float] = {}

            def on_rank0() -> None:
                for sink in self.sinks:
                    sink.log_measurement(m, tail=tail, head=head)
                scalars.update(measurement_scalars(m, tail, head))
                if log is not None and scalars:
                    log(scalars)

            self._agreed_on_rank0(on_rank0, "a sink's log_measurement or the trainer's loggers")
            return scalars
        except BaseException:
            self.release()  # the run ends with this error: do not leave the lens bound to its model
            self._pending_warnings.clear()  # about this measurement: not for a later run's first agreed work
            raise
