"""Learning-rate tuning for batch sweeps: the paper's synchronized successive halving (App. B.3).

``trainable.py`` is the contract with the workloads the tuner trains.
"""
from .trainable import Candidate, Report, Trainable

__all__ = ["Candidate", "Report", "Trainable"]
