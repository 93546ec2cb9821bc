"""Learning-rate tuning for batch sweeps: the paper's synchronized successive halving (App. B.3), on Optuna.

- :func:`candidate_set`: the learning-rate candidates of a family at a tier (pure; no Optuna).
- :func:`tune`: train every candidate as an Optuna trial, rung by rung; write the choices file.
- :func:`load_choices`: read the chosen candidate per family/tier (what the replications read).
- ``trainable.py`` is the contract with the workloads the tuner trains.

Optuna is an optional extra (``pip install 'spectral-lens[tune]'``), imported when ``tune`` is used.
"""
from .candidates import PAPER_MULTIPLIERS, candidate_set
from .choices import Choices, load_choices
from .trainable import Candidate, Report, Trainable

__all__ = ["Candidate", "Report", "Trainable", "candidate_set", "PAPER_MULTIPLIERS", "tune", "TuneResult",
           "TrialSummary", "load_choices", "Choices"]


def __getattr__(name):
    if name in ("tune", "TuneResult", "TrialSummary"):
        from . import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'examples.tune' has no attribute {name!r}")
