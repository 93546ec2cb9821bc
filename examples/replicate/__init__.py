"""The shared replication pipeline: tune -> train tiers -> measure -> predict -> report.

``workload.py`` is the contract each replication (``examples.toy``, ``examples.speedrun``) fulfils;
``pipeline.replicate`` runs it (``tuning``, ``runs``, ``verdict``, ``progress`` hold the stages).
"""
from .pipeline import replicate
from .tuning import TunerSettings
from .verdict import Verdict
from .workload import Workload

__all__ = ["TunerSettings", "Verdict", "Workload", "replicate"]
