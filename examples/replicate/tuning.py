"""The pipeline's tuning stage: per-tier learning rates from the tuner (``examples.tune``, issue #10).

The tuner writes a choices file; this stage reads it (``load_choices``) and hands the pipeline one
learning rate per optimizer group for every ``(family, tier)``. An existing choices file is reused,
so an interrupted pipeline does not tune twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .workload import Workload

__all__ = ["TunerSettings", "choose_rates"]


@dataclass(frozen=True)
class TunerSettings:
    """A preset's settings of the learning-rate tuner.

    Attributes:
        rungs: cumulative budgets of the successive-halving rungs, in the workload's unit (the
            paper: 50M, 150M, 500M tokens); the last is the horizon the schedules are set against.
        mode: the tuner's mode (``"synchronized"``: the paper's synchronized successive halving).
        n_workers: worker processes of the tuner.
        multipliers: the multipliers of the two scaling centers; ``None``: the paper's five
            ``{0.5, 1/sqrt(2), 1, sqrt(2), 2}``.
    """

    rungs: tuple[int, ...]
    mode: str = "synchronized"
    n_workers: int = 1
    multipliers: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.rungs or any(b <= 0 for b in self.rungs) or list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"TunerSettings.rungs must be increasing positive budgets, got {self.rungs}")
        if self.n_workers < 1:
            raise ValueError(f"TunerSettings.n_workers must be >= 1, got {self.n_workers}")


def choose_rates(workload: Workload, workdir: Path, settings: TunerSettings, *, stream=None
                 ) -> dict[tuple[str, int], dict[str, float]]:
    """Learning rates per ``(family, tier)``: tune them (or reuse ``workdir/choices.json``) and read them back.

    The study lives in a journal file (``workdir/tune.journal``), so an interrupted tuning stage
    continues where it stopped when the pipeline is run again; ``stream=False`` silences the tuner.
    """
    from examples.tune import load_choices, tune  # the tuner (examples/tune, issue #10)

    workdir.mkdir(parents=True, exist_ok=True)
    choices_path = workdir / "choices.json"
    if not choices_path.exists():
        families: Mapping[str, Mapping[str, float]] = {f: dict(workload.reference_lrs(f)) for f in workload.families}
        extra = {} if settings.multipliers is None else {"multipliers": tuple(settings.multipliers)}
        tune(workload.trainable(), families=families, tiers=tuple(workload.tiers),
             reference_tier=workload.reference_tier, rungs=tuple(settings.rungs), workdir=workdir,
             choices_path=choices_path, mode=settings.mode, storage=f"journal:{workdir / 'tune.journal'}",
             study_name=f"{workload.name}-tune", n_workers=settings.n_workers, progress=stream is not False,
             **extra)
    chosen = load_choices(choices_path)
    out = {}
    for family in workload.families:
        for tier in workload.tiers:
            if (family, tier) not in chosen:
                raise ValueError(f"{choices_path}: no choice for family {family!r}, tier {tier} "
                                 f"(has {sorted(chosen)}); delete {workdir} (the choices and the tuner's study, "
                                 "tune.journal, which would give the same choices again) to tune again")
            out[(family, tier)] = {k: float(v) for k, v in chosen[(family, tier)].lrs.items()}
    return out

