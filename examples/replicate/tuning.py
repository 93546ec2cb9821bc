"""The pipeline's tuning stage: per-tier learning rates from the tuner (``examples.tune``, issue #10).

The tuner writes a choices file; this stage reads it (``load_choices``) and hands the pipeline one
learning rate per optimizer group for every ``(family, tier)``. An existing choices file is reused,
so an interrupted pipeline does not tune twice, unless it records other rungs, mode or reference tier
(then a ``ValueError`` says to delete the tuning directory).
"""
from __future__ import annotations

import contextlib
import json
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


def _check_settings(choices_path: Path, workdir: Path, want: dict) -> None:
    """Refuse a choices file whose recorded rungs, mode or reference tier are not ``want``'s."""
    try:
        have = json.loads(choices_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_choices below names the file and what is wrong with it
    if not isinstance(have, dict):
        return
    diff = [f"{k} {have.get(k)!r} vs {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ValueError(f"{choices_path} was tuned with other settings ({'; '.join(diff)}); delete {workdir} "
                         "(the choices and the tuner's study, tune.journal) to tune again with these")


@contextlib.contextmanager
def _optuna_warnings_only():
    """Optuna's INFO lines off in the block (restored after), as ``python -m examples.tune`` has them: the job printed
    ``[I <time>] A new study created in Journal ...`` and, from each spawned worker (which takes this verbosity),
    ``Using an existing study ... instead of creating a new one``, which reads as a problem to a first-time user; the
    tuner's own ``tune:`` lines say what happens."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(before, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def choose_rates(workload: Workload, workdir: Path, settings: TunerSettings, *, stream=None
                 ) -> dict[tuple[str, int], dict[str, float]]:
    """Learning rates per ``(family, tier)``: tune them (or reuse ``workdir/choices.json``) and read them back.

    The study lives in a journal file (``workdir/tune.journal``), so an interrupted tuning stage
    continues where it stopped when the pipeline is run again; ``stream=False`` silences the tuner.
    """
    from examples.tune import load_choices  # the tuner (examples/tune, issue #10); no Optuna needed to read choices

    workdir.mkdir(parents=True, exist_ok=True)
    choices_path = workdir / "choices.json"
    if choices_path.exists():  # reused only if tuned under these settings (the tuner refuses such a resume too)
        _check_settings(choices_path, workdir, dict(rungs=list(settings.rungs), mode=settings.mode,
                                                    reference_tier=workload.reference_tier))
    else:
        from examples.tune import tune  # Optuna (the tune extra): only to tune, not to reuse the choices

        families: Mapping[str, Mapping[str, float]] = {f: dict(workload.reference_lrs(f)) for f in workload.families}
        extra = {} if settings.multipliers is None else {"multipliers": tuple(settings.multipliers)}
        with _optuna_warnings_only():
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

