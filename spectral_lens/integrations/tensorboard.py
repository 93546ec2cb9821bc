"""TensorBoard sink (extra ``tensorboard``: ``pip install 'spectral-lens[tensorboard]'``)."""

from __future__ import annotations

import os

from ..lens import LensMeasurement
from ._figure import measurement_images
from ._require import require
from .summaries import measurement_scalars

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Log measurements to TensorBoard through ``torch.utils.tensorboard.SummaryWriter``.

    Per measurement, at ``global_step = measurement.step``: one scalar per spectrum and summary
    (``<prefix><spectrum>/alpha_tail``, ``.../alpha_head``, ``.../rankme``, ``.../stable_rank``) and
    per measurement scalar (``<prefix>noise_scale``, ...), see
    :func:`~spectral_lens.integrations.measurement_scalars`; with ``figures=True`` one image per
    spectrum (``<prefix><spectrum>/spectrum``: the trace-normalized spectrum against rank, log-log,
    alpha windows shaded; needs matplotlib). Non-finite values (``NaN`` for a window the spectrum
    cannot resolve, ``inf`` for the noise scale of a zero mean gradient) are logged as they are.

    Args:
        writer: a ``SummaryWriter`` (left open; you close it) or a log directory (a writer is
            created there and closed by :meth:`close`).
        figures: also log spectrum figures (needs matplotlib: extra ``plot``, also installed by the
            ``tensorboard`` extra; without it the sink raises an ``ImportError`` when built, so pass
            ``figures=False``).
        prefix: prefix of every tag.

    Use with a framework callback (``sinks=[TensorBoardSink("tb")]``) or by hand:
    ``sink.log_measurement(lens.measure(step, tokens))``.

    When a callback resumes training from a checkpoint at step ``T``, it calls :meth:`resumed`: a
    sink built on a log directory reopens its writer with ``purge_step=T + 1``, so TensorBoard hides
    what the interrupted run logged after the checkpoint and shows the replayed steps once. A writer
    you pass in is yours: open it with ``SummaryWriter(log_dir, purge_step=T + 1)`` when you resume.
    """

    def __init__(self, writer, *, figures: bool = True, prefix: str = "spectral_lens/") -> None:
        if isinstance(writer, (str, os.PathLike)):  # first: the tensorboard extra installs matplotlib too
            tb = require("torch.utils.tensorboard", "tensorboard", "TensorBoardSink", package="tensorboard")
        if figures:  # fail now (before a writer is created), not at the first measurement hours into training
            from ..plot import require_matplotlib

            require_matplotlib()
        if isinstance(writer, (str, os.PathLike)):
            self.writer = tb.SummaryWriter(log_dir=os.fspath(writer))
            self._owned = True
            self._summary_writer = tb.SummaryWriter
        elif callable(getattr(writer, "add_scalar", None)):
            self.writer = writer
            self._owned = False
        else:
            raise TypeError(
                f"TensorBoardSink: writer must be a SummaryWriter or a log directory, got {type(writer).__name__}"
            )
        self.figures = bool(figures)
        self.prefix = prefix

    def log_measurement(
        self,
        measurement: LensMeasurement,
        tail: tuple[int, int] | None = (100, 200),
        head: tuple[int, int] | None = (10, 40),
    ) -> None:
        """Write one measurement's scalars (and figures) at ``measurement.step``; flush."""
        step = int(measurement.step)
        for tag, value in measurement_scalars(measurement, tail, head, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=step)
        if self.figures:
            for tag, image in measurement_images(measurement, tail, head, self.prefix):
                self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def log_val_loss(self, step: int, val_loss: float) -> None:
        """Write a validation loss a callback kept at an already measured ``step`` (see
        :meth:`LensDriver.record_val_loss <spectral_lens.integrations._driver.LensDriver.record_val_loss>`)
        as ``<prefix>val_loss``, the tag a measurement with a loss writes it under; flush."""
        self.writer.add_scalar(f"{self.prefix}val_loss", float(val_loss), global_step=int(step))
        self.writer.flush()

    def resumed(self, step: int) -> None:
        """Training resumed from a checkpoint at ``step``: hide what was logged after it (a writer this
        sink created is closed and reopened with ``purge_step=step + 1``; a writer passed in is left as is)."""
        if self._owned:
            log_dir = self.writer.get_logdir()
            self.writer.close()
            self.writer = self._summary_writer(log_dir=log_dir, purge_step=int(step) + 1)

    def close(self) -> None:
        """Flush, and close the writer if this sink created it."""
        self.writer.flush()
        if self._owned:
            self.writer.close()

    def __enter__(self) -> "TensorBoardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
