"""The contract between the shared replication pipeline and one replication (toy, speedrun).

Every replication runs the same pipeline: tune a learning rate per family and batch tier, train every
tier of every family with its chosen rate while :class:`spectral_lens.SpectralLens` measures spectra on
a fixed held-out pool, then predict (``TailPredictor`` and the noise-scale baseline) and report. A
:class:`Workload` says what is trained and how; the pipeline (``examples.replicate.pipeline``) does the
rest, so the toy and the speedrun differ only in their workloads and presets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

from examples.tune.trainable import Trainable

__all__ = ["Workload"]


class Workload(Protocol):
    """One replication's experiment.

    Attributes:
        name: short name used in paths and reports (``"toy"``, ``"speedrun-cpu"``).
        unit: what budgets and resources count: ``"tokens"`` or ``"examples"``.
        families: the variant chain, in order (for the gain plane and the taxonomy).
        tiers: the batch tiers of the sweep.
        reference_tier: the tuner's reference tier ``B0``.
        target_loss: the validation loss a run must reach, pre-registered (never chosen after the runs).
        budget: the training budget of each measured run, in ``unit``.

    Optional (read with defaults by ``examples.replicate.pipeline``; not part of the required contract):
        fraction: the early progress fraction of the prediction (default 0.2, the paper's).
        window: the tail rank window (default: the records' scale rule for ``n_layer``).
        report_sections(runs, out_dir) -> list[str]: extra Markdown sections for the report, with
            any figures written into ``out_dir``.
    """

    name: str
    unit: str
    families: tuple[str, ...]
    tiers: tuple[int, ...]
    reference_tier: int
    target_loss: float
    budget: int

    def reference_lrs(self, family: str) -> Mapping[str, float]:
        """The family's reference rate per optimizer group at ``reference_tier``."""
        ...

    def trainable(self) -> Trainable:
        """The callable the tuner trains candidates with (no spectral measurements)."""
        ...

    def run(self, family: str, tier: int, lrs: Mapping[str, float], run_dir: Path) -> Path:
        """Train one measured run and write its record (a ``RunWriter`` directory) to ``run_dir``.

        SpectralLens measures at the workload's schedule, which must resolve 10-50% progress. The
        record must be complete when this returns; the pipeline treats a directory without a finished
        record as not run and trains it again (resume at run granularity).
        """
        ...
