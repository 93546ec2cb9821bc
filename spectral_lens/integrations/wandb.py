"""Weights & Biases sink (extra ``wandb``: ``pip install 'spectral-lens[wandb]'``)."""

from __future__ import annotations

from ..lens import LensMeasurement
from ._figure import measurement_images
from ._require import require
from .summaries import measurement_scalars

__all__ = ["WandbSink"]


class WandbSink:
    """Log measurements to a Weights & Biases run.

    The same scalars as :class:`~spectral_lens.integrations.TensorBoardSink` (see
    :func:`~spectral_lens.integrations.measurement_scalars`), plus ``<prefix>step`` (the training
    step of the measurement), declared as the x-axis of every ``<prefix>*`` metric with
    ``define_metric``, so the sink never fights another logger over W&B's own step counter. With
    ``figures=True``, one ``wandb.Image`` per spectrum (needs matplotlib). Non-finite values are
    logged as they are.

    Args:
        run: a run from ``wandb.init`` (default: the active ``wandb.run``). Offline runs
            (``WANDB_MODE=offline``) work the same.
        figures: also log spectrum figures (needs matplotlib, extra ``plot``; checked when the sink is built).
        prefix: prefix of every key.
    """

    def __init__(self, run=None, *, figures: bool = False, prefix: str = "spectral_lens/") -> None:
        self._wandb = require("wandb", "wandb", "WandbSink")
        if figures:  # fail now, not at the first measurement hours into training
            from ..plot import require_matplotlib

            require_matplotlib()
        run = run if run is not None else self._wandb.run
        if run is None:
            raise ValueError("WandbSink: no active W&B run; call wandb.init(...) first or pass run=")
        self.run = run
        self.figures = bool(figures)
        self.prefix = prefix
        self.run.define_metric(f"{prefix}step")
        self.run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")

    def log_measurement(
        self,
        measurement: LensMeasurement,
        tail: tuple[int, int] | None = (100, 200),
        head: tuple[int, int] | None = (10, 40),
    ) -> None:
        """Log one measurement's scalars (and figures) in one ``run.log`` call."""
        data: dict = dict(measurement_scalars(measurement, tail, head, self.prefix))
        data[f"{self.prefix}step"] = int(measurement.step)
        if self.figures:
            for tag, image in measurement_images(measurement, tail, head, self.prefix):
                data[tag] = self._wandb.Image(image)
        self.run.log(data)

    def log_val_loss(self, step: int, val_loss: float) -> None:
        """Log a validation loss a callback kept at an already measured ``step`` (see
        :meth:`LensDriver.record_val_loss <spectral_lens.integrations._driver.LensDriver.record_val_loss>`)
        as ``<prefix>val_loss`` against ``<prefix>step``, the key a measurement with a loss logs it under."""
        self.run.log({f"{self.prefix}val_loss": float(val_loss), f"{self.prefix}step": int(step)})
